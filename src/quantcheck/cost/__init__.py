"""Cost, measured the same way for every engine: load, weight memory, the latency sweep, generation; the trackers
(memory, timing, contention) know nothing of engines."""
