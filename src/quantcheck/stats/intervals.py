"""Intervals for one model's numbers: a proportion (Wilson) and a mean (percentile bootstrap).

Wilson rather than the normal (Wald) interval because benchmark accuracies sit near 0 or 1 on small
item counts, where Wald undercovers and can leave [0, 1]. The bootstrap is for per-item means with
no convenient distribution (KL, top-k Jaccard, top-1 agreement); it is seeded so that a run's
`results.json` is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from quantcheck.results.schema import Accuracy, Estimate, Interval


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval for `successes` out of `n`; raises ValueError when n == 0."""
    if n <= 0:
        raise ValueError(f"a proportion needs at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n], got {successes} of {n}")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return Interval(low=float(ci.low), high=float(ci.high), level=level, method="wilson")


def accuracy(correct: Sequence[bool]) -> Accuracy:
    """Accuracy of one model over its items, with a 95 % Wilson interval."""
    n = len(correct)
    hits = sum(bool(c) for c in correct)
    ci = wilson_interval(hits, n)
    return Accuracy(n=n, correct=hits, accuracy=hits / n, ci=ci)


def bootstrap_mean(
    values: Sequence[float], seed: int, resamples: int = 2000, level: float = 0.95
) -> Estimate:
    """Mean with a percentile-bootstrap interval, reproducible for a given seed.

    A constant sample has no spread to resample, so its interval is the value itself (zero
    width); a single value has no interval at all (`ci` is None).
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("cannot take the mean of no values")
    mean = float(data.mean())
    if data.size == 1:
        return Estimate(value=mean)
    method = "percentile-bootstrap"
    if np.ptp(data) == 0:
        return Estimate(value=mean, ci=Interval(low=mean, high=mean, level=level, method=method))
    result = stats.bootstrap(
        (data,),
        np.mean,
        n_resamples=resamples,
        confidence_level=level,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return Estimate(
        value=mean,
        ci=Interval(low=float(interval.low), high=float(interval.high), level=level, method=method),
    )
