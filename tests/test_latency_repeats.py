"""Latency repeats stop on the relative standard error of the median, the statistic reported (issue #24, defect 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantcheck.cost.latency import Repeats, relative_standard_error, repeat_timed


class FakeClock:
    """A clock that each timed call moves on by its next duration."""

    def __init__(self, durations: list[float]) -> None:
        self.t, self.durations = 0.0, iter(durations)

    def now(self) -> float:
        return self.t

    def since(self, start: float) -> float:
        return self.t - start

    def call(self) -> None:
        self.t += next(self.durations)


def test_relative_standard_error_is_the_medians():
    times = [1.00, 1.01, 5.00, 0.99, 1.00]  # one slow pass: the median does not move, the mean does
    values = np.array(times)
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    assert relative_standard_error(times) == pytest.approx(
        math.sqrt(math.pi / 2) * 1.4826 * mad / math.sqrt(5) / median
    )
    assert relative_standard_error(times) < 0.02 < values.std(ddof=1) / math.sqrt(5) / values.mean()
    assert relative_standard_error([1.0]) == math.inf
    # on normal timings the median's standard error is about sqrt(pi/2) times the mean's, never below it on average
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 0.05, size=(2000, 10))
    ratio = np.mean([relative_standard_error(row) for row in samples]) / np.mean(
        samples.std(axis=1, ddof=1) / math.sqrt(10)
    )
    assert 1.1 < ratio < 1.4


def test_one_slow_pass_does_not_keep_a_stable_median_repeating():
    clock = FakeClock([1.00, 1.01, 5.00, 0.99, 1.00] + [1.0] * 20)
    times = repeat_timed(
        clock.call, clock, Repeats(warmup=0, min_iterations=5, max_iterations=20, time_budget_s=1e9, target_rse=0.02)
    )
    assert len(times) == 5 and np.median(times) == 1.0
    clock = FakeClock([1.0, 1.2, 0.8, 1.1, 0.9, 1.3, 0.7] + [1.0, 1.2, 0.8] * 10)  # a median that is not stable goes on
    assert len(repeat_timed(clock.call, clock, Repeats(0, 5, 20, 1e9, 0.02))) > 5
