"""Consideration 1, cost: weight bytes, peak memory, forward latency and generation throughput."""
