"""How much CPU other processes took while a measurement ran, measured rather than guessed.

A timing taken while something else runs is slower than the model is. Comparing rounds cannot
always tell (load can span all of one model's rounds and none of another's), so each timed window
records the CPU time the CPUs this process may use spent (its affinity; the whole machine where that
is unknown) beside the CPU time of this process tree: the difference, plus the hypervisor's steal, is
what others took. It is judged against the cores the run computes on, not against every CPU of the host.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

DISTURBED_SHARE = 0.10
"""On CPU, a window in which others took more than the CPUs the run leaves idle plus this share of the cores it
computes on (`cores_in_use`) is disturbed: with every one of its cores busy, even a small share stalls its threads
at each barrier, while load on CPUs it does not use leaves it alone."""


def _affinity() -> list[int] | None:
    """The CPUs this process may run on, where the system says (None: all of them)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cpus_allowed() -> int:
    """How many CPUs this process may use (the ones `_machine_cpu_seconds` reads)."""
    cpus = _affinity()
    return len(cpus) if cpus else (psutil.cpu_count() or 1)


def cores_in_use() -> int:
    """The cores the run computes on: the CPUs this process may use, at most torch's threads where torch is loaded
    (the worker sets them for every engine)."""
    cores = _cpus_allowed()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else None
    return max(1, min(cores, threads) if threads else cores)


def disturbance_limit() -> float:
    """Cores' worth of others' CPU time above which a timing is disturbed: the allowed CPUs the run leaves idle,
    plus DISTURBED_SHARE of the ones it computes on (others' load is read over every allowed CPU)."""
    in_use = cores_in_use()
    return (_cpus_allowed() - in_use) + DISTURBED_SHARE * in_use


@dataclass
class OtherLoad:
    """Cores' worth of CPU time that others took during the window (None until it closes)."""

    cores: float | None = None

    def fields(self, device: object) -> dict[str, float | bool | None]:
        """The schema's `other_cpu_load` and `disturbed` for a timing on `device` (host load is judged on CPU only)."""
        disturbed = str(device).startswith("cpu") and self.cores is not None and self.cores > disturbance_limit()
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
    """Seconds the CPUs this process may use spent running anything, plus what the hypervisor stole from them
    (all of the machine's CPUs where the affinity is unknown or the per-CPU figures do not line up with it)."""
    busy = ("user", "nice", "system", "irq", "softirq", "steal")
    cpus = _affinity()
    per_cpu = psutil.cpu_times(percpu=True) if cpus else None
    if per_cpu and len(per_cpu) == (psutil.cpu_count() or 0) and max(cpus) < len(per_cpu):
        return sum(getattr(per_cpu[cpu], name, 0.0) for cpu in cpus for name in busy)
    times = psutil.cpu_times()
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
