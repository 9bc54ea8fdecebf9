"""How much CPU other processes took while a measurement ran, measured rather than guessed.

A timing taken while something else runs is slower than the model is. Comparing rounds cannot
always tell (load can span all of one model's rounds and none of another's), so each timed window
records the CPU time the whole machine spent beside the CPU time of this process tree: the
difference, plus the hypervisor's steal, is what others took.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

DISTURBED_SHARE = 0.10
"""On CPU, a window in which others took more than this share of the machine's CPU time is disturbed:
with every core busy running the model, even a small share stalls its threads at each barrier."""


@dataclass
class OtherLoad:
    """Cores' worth of CPU time that others took during the window (None until it closes)."""

    cores: float | None = None

    def fields(self, device: object) -> dict[str, float | bool | None]:
        """The schema's `other_cpu_load` and `disturbed` for a timing on `device` (host load is judged on CPU only)."""
        disturbed = str(device).startswith("cpu") and self.cores is not None and self.cores > DISTURBED_SHARE * (psutil.cpu_count() or 1)
        return {"other_cpu_load": self.cores, "disturbed": disturbed}


def _tree_cpu_seconds() -> dict[int, float]:
    """User plus system seconds of this process and each of its descendants (engine subprocesses), by pid."""
    me = psutil.Process()
    seconds = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a child that just exited
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def _machine_cpu_seconds() -> float:
    """Seconds all cores spent running anything, plus what the hypervisor stole from them."""
    times = psutil.cpu_times()
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(times, name, 0.0) for name in busy)


@contextmanager
def other_load() -> Iterator[OtherLoad]:
    """Measure what others took while the block ran; read `.cores` after it."""
    load = OtherLoad()
    tree, machine, started = _tree_cpu_seconds(), _machine_cpu_seconds(), time.monotonic()
    try:
        yield load
    finally:
        elapsed = time.monotonic() - started
        own = sum(seconds - tree.get(pid, 0.0) for pid, seconds in _tree_cpu_seconds().items())
        others = max(0.0, _machine_cpu_seconds() - machine - own)
        load.cores = others / elapsed if elapsed > 0 else None
