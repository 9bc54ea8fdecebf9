"""Forward-pass latency and peak memory across batch sizes, repeated until the median is stable.

Each batch size gets warm-up passes, then timed passes until the relative standard error of the
median (the statistic reported) reaches the target (after a minimum) or the batch size's time budget is spent. Running
out of memory at one batch size is a result ("oom"), not a crash: larger batch sizes are "skipped".
Runs under `torch.no_grad()`, not `inference_mode()`: quanto int4 fails under inference mode.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from quantcheck.cost.contention import other_load
from quantcheck.cost.memory import PeakMemoryTracker
from quantcheck.cost.timing import Clock
from quantcheck.schema.results import LatencyPoint

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
NOISY_CV = 0.10


class MemoryCapExceeded(MemoryError):
    """The process went over the user's memory cap (how a cap is enforced on CPU)."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for every way running out of memory surfaces: torch OOM, MemoryError, CUDA/allocator text."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@dataclass(frozen=True)
class Repeats:
    """How often one batch size runs: warm-up, then until stable, out of time or at the maximum."""

    warmup: int
    min_iterations: int
    max_iterations: int
    time_budget_s: float
    target_rse: float

    def __post_init__(self) -> None:
        if self.min_iterations < 1 or self.max_iterations < self.min_iterations:
            raise ValueError("need 1 <= min_iterations <= max_iterations")

    @classmethod
    def of(cls, settings) -> Repeats:
        """The repeats a `CostSettings` asks for (every backend's sweep times the same way)."""
        return cls(
            settings.warmup,
            settings.min_iterations,
            settings.max_iterations,
            settings.time_budget_s,
            settings.target_rse,
        )


def sweep_batch_sizes(
    time_batch: Callable[[int, PeakMemoryTracker], list[float]],
    batch_sizes: Sequence[int],
    seq_len: int,
    device: torch.device | str,
    tracker: PeakMemoryTracker,
    on_point: Callable[[LatencyPoint], None] | None = None,
) -> list[LatencyPoint]:
    """One point per batch size, each in its own memory phase; an OOM ends the sweep (larger sizes 'skipped').

    Engine-neutral: `time_batch(batch_size, tracker)` runs and times one batch size (any backend).
    Each point records the CPU load others put on the machine meanwhile; on CPU, a point that others
    disturbed is marked so, and the verdict does not call a variant faster or slower from it.
    """
    device = torch.device(device)
    points: list[LatencyPoint] = []

    def add(point: LatencyPoint) -> None:
        points.append(point)
        if on_point is not None:
            on_point(point)

    oom_at: int | None = None
    for batch_size in batch_sizes:
        if oom_at is not None:
            error = f"not run: out of memory at batch size {oom_at}"
            add(LatencyPoint(batch_size=batch_size, seq_len=seq_len, status="skipped", error=error))
            continue
        failure: Exception | None = None
        with tracker.phase(f"latency-batch-{batch_size}") as phase, other_load() as others:
            try:
                times = time_batch(batch_size, tracker)
            except Exception as error:  # one batch size failing must not lose the others
                failure = error
        if failure is None:
            add(_ok_point(batch_size, seq_len, times, phase.peak_bytes).model_copy(update=others.fields(device)))
            continue
        oom = is_out_of_memory(failure)
        message = _first_line(failure) if oom else f"{type(failure).__name__}: {_first_line(failure)}"
        del failure  # its traceback holds the activations: drop it before freeing memory
        _free_memory(device)
        status = "oom" if oom else "failed"
        add(
            LatencyPoint(
                batch_size=batch_size, seq_len=seq_len, status=status, error=message, peak_memory_bytes=phase.peak_bytes
            )
        )
        if oom:
            oom_at = batch_size
    return points


def repeat_timed(
    call: Callable[[], object], clock: Clock, repeats: Repeats, check: Callable[[], None] = lambda: None
) -> list[float]:
    """Warm up, then time `call` until the median is stable, the budget is spent or the maximum is reached.

    `check` runs after every call while its result is still alive (the CPU memory cap).
    """
    started = clock.now()
    for _ in range(repeats.warmup):
        result = call()
        check()
        del result
    times: list[float] = []
    while True:
        begin = clock.now()
        result = call()
        times.append(clock.since(begin))
        check()
        del result
        if len(times) >= repeats.max_iterations:
            return times
        if len(times) >= repeats.min_iterations and (
            relative_standard_error(times) <= repeats.target_rse or clock.since(started) >= repeats.time_budget_s
        ):
            return times


MEDIAN_SE_FACTOR = (
    math.sqrt(math.pi / 2) * 1.4826
)  # normal theory: SE(median) = sqrt(pi/2) sigma / sqrt(n), sigma = 1.4826 MAD


def relative_standard_error(times: Sequence[float]) -> float:
    """Standard error of the median over the median (infinite with fewer than two samples): sqrt(pi/2) * sigma /
    sqrt(n), with sigma estimated robustly from the median absolute deviation (1.4826 MAD), so that one slow
    outlier, which leaves the median where it is, does not keep the repeats going as it would the mean's."""
    if len(times) < 2:
        return math.inf
    values = np.asarray(times, dtype=np.float64)
    median = float(np.median(values))
    spread = float(np.median(np.abs(values - median)))
    return MEDIAN_SE_FACTOR * spread / math.sqrt(len(values)) / median


def _ok_point(batch_size: int, seq_len: int, times: list[float], peak: int | None) -> LatencyPoint:
    values = np.asarray(times)
    median = float(np.median(values))
    cv = float(values.std(ddof=1) / values.mean()) if len(values) > 1 else None
    return LatencyPoint(
        batch_size=batch_size,
        seq_len=seq_len,
        status="ok",
        iterations=len(values),
        median_s=median,
        p10_s=float(np.percentile(values, 10)),
        p90_s=float(np.percentile(values, 90)),
        cv=cv,
        noisy=cv is not None and cv > NOISY_CV,
        tokens_per_s=batch_size * seq_len / median,
        peak_memory_bytes=peak,
        times_s=[float(t) for t in values],
    )


def check_cpu_cap(device: torch.device, cap: int | None, tracker: PeakMemoryTracker) -> None:
    """Over the cap on CPU, a MemoryCapExceeded (CUDA enforces its own cap in the allocator)."""
    if cap is None or device.type == "cuda":
        return
    peak = tracker.peak_so_far()
    if peak > cap:
        raise MemoryCapExceeded(
            f"exceeded the memory cap of {cap / 2**30:.2f} GiB (peak resident memory {peak / 2**30:.2f} GiB)"
        )


@contextmanager
def cuda_memory_cap(device: torch.device, cap: int | None) -> Iterator[None]:
    """Limit the CUDA caching allocator so that going over the cap raises a real OutOfMemoryError."""
    if cap is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
