"""Intervals for one model's numbers: proportions (Wilson) and means (two kinds).

Wilson rather than the normal (Wald) interval because benchmark accuracies and top-1 agreement
sit near 0 or 1 on small item counts, where Wald undercovers and can leave [0, 1].

Means come in two kinds. Per-item KL is non-negative and heavy-tailed (roughly lognormal with a
log-scale spread of 1.5-2): a few items carry most of the mean, and the percentile bootstrap's
upper bound fell below the true mean in 17 % of samples of 50 items and 12 % of 166 (spread 1.5;
2.5 % is nominal), so a variant passed the KL limit too easily. `heavy_tailed_mean` is built for
it. The top-k Jaccard means are bounded in [0, 1] and only described, never judged by the
verdict, so `bootstrap_mean` keeps the plain percentile bootstrap for them. Every resampling is
seeded, so a run's `results.json` is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from quantcheck.schema.results import Accuracy, Estimate, Interval

RESAMPLE_CELLS = 4_000_000
"""Values drawn per bootstrap chunk: bounds memory on a full MMLU run (14k items) to ~32 MB."""

LEFT_SKEW_Z = 2.0
"""Logs skewed left by more than this many standard errors (sqrt(6/k)) reject the lognormal model
in the direction where it overstates the mean; it is then left out (see `_log_mean_pivots`)."""

MAX_BOUND = float(np.finfo(float).max)
"""An upper bound that overflows is this: finite, so results.json reads back, and beyond any limit."""

LOGNORMAL_DRAWS = 20_000
"""Monte Carlo draws of the lognormal pivotal quantity; its 99 %+ quantiles stay stable."""


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


def proportion(flags: Sequence[bool], level: float = 0.95, fail_level: float | None = None) -> Estimate:
    """Share of true flags with a Wilson interval (and one at `fail_level` for the verdict)."""
    n = len(flags)
    hits = sum(bool(flag) for flag in flags)
    return Estimate(
        value=hits / n,
        ci=wilson_interval(hits, n, level),
        fail_ci=None if fail_level is None else wilson_interval(hits, n, fail_level),
        units=n,
    )


def bootstrap_mean(values: Sequence[float], seed: int, resamples: int = 2000, level: float = 0.95) -> Estimate:
    """Mean with a percentile-bootstrap interval, reproducible for a given seed.

    For bounded values that the verdict does not judge (top-k Jaccard). A constant sample has no
    spread to resample, so its interval is the value itself (zero width); a single value has no
    interval at all (`ci` is None).
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("cannot take the mean of no values")
    mean = float(data.mean())
    if data.size == 1:
        return Estimate(value=mean, units=1)
    method = "percentile-bootstrap"
    if np.ptp(data) == 0:
        return Estimate(value=mean, ci=Interval(low=mean, high=mean, level=level, method=method), units=int(data.size))
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
        units=int(data.size),
    )


def _studentized_pivots(data: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Bootstrap-t pivots (resampled mean - mean) / resampled standard error, vectorized in chunks.

    A resample without spread (possible only with many tied values and few items) has no
    standard error; its pivot is dropped rather than counted as infinite.
    """
    n = data.size
    chunk = max(1, RESAMPLE_CELLS // n)
    pivots = []
    for start in range(0, resamples, chunk):
        sample = data[rng.integers(0, n, size=(min(chunk, resamples - start), n))]
        spread = sample.std(axis=1, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            pivots.append((sample.mean(axis=1) - data.mean()) / (spread / np.sqrt(n)))
    all_pivots = np.concatenate(pivots)
    return all_pivots[np.isfinite(all_pivots)]


def _log_mean_pivots(data: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Draws of the log of the mean under a delta-lognormal model (zeros, then lognormal values).

    The generalized pivotal quantity of Krishnamoorthy & Mathew (2003, J. Stat. Plan. Inference
    114:103-116) for the lognormal mean exp(mu + sigma^2 / 2), plus log of a Jeffreys (Beta) draw
    of the non-zero share for exact zeros (Tian 2005, Stat. Med. 24:3223-3232). Its quantiles give
    near-exact intervals when the model holds. None when it cannot be fitted (fewer than three
    non-zero values) or when the logs are clearly left-skewed: there the model overstates the mean
    by a factor that does not shrink with more items (1.28 for exponential values), while the
    bootstrap-t alone covers well, the upper tail being light.
    """
    positive = data[data > 0]
    k, zeros = positive.size, data.size - positive.size
    if k < 3:
        return None
    logs = np.log(positive)
    if stats.skew(logs) < -LEFT_SKEW_Z * np.sqrt(6 / k):
        return None
    mean, variance = logs.mean(), logs.var(ddof=1)
    normal = rng.standard_normal(LOGNORMAL_DRAWS)
    chi2 = rng.chisquare(k - 1, LOGNORMAL_DRAWS)
    mu = mean - normal * np.sqrt(variance / k) * np.sqrt((k - 1) / chi2)
    sigma2 = (k - 1) * variance / chi2
    nonzero = rng.beta(k + 0.5, zeros + 0.5, LOGNORMAL_DRAWS)
    return mu + sigma2 / 2 + np.log(nonzero)


def heavy_tailed_mean(
    values: Sequence[float],
    seed: int,
    level: float = 0.95,
    fail_level: float | None = None,
    resamples: int = 2000,
) -> Estimate:
    """Mean of non-negative, heavy-tailed values (per-item KL): each bound the wider of two methods.

    - Bootstrap-t (studentized bootstrap): no distributional assumption, second-order accurate,
      but with 50-166 items it cannot see the part of the upper tail the sample missed.
    - Delta-lognormal generalized pivotal quantity (`_log_mean_pivots`): near-exact when the
      values are lognormal (with exact zeros), wrong when they are not; left out when the logs
      are clearly left-skewed.

    The lower of the two lower bounds and the higher of the two upper bounds hold whenever either
    method does. For lognormal values (log-scale spread 1.5-2) the upper bound falls below the
    true mean in 1-4 % of samples of 5 to 166 items, where 2.5 % is nominal (percentile
    bootstrap: 12-30 %, bootstrap-t alone: 11-18 % below 30 items; simulated in tests/test_stats.py).
    The lognormal part is used from three non-zero values: on few items its bound is wide (an
    identity variant's KL of 1e-12..1e-7 on 8 items reached 1e67 nats), which leaves the check
    unclear, the honest answer on so little; bootstrap-t alone passed such samples too easily. The
    price is width: the upper bound sits further out, so a KL near the limit stays unclear longer. The method is
    recorded as "bootstrap-t|delta-lognormal", or "bootstrap-t" when the lognormal part is out.
    `fail_ci` is the same interval at `fail_level` (the verdict's Bonferroni level), from the same
    draws. A constant sample gets a zero-width interval, a single value none.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("cannot take the mean of no values")
    if (data < 0).any():
        raise ValueError("heavy_tailed_mean is for non-negative values (per-item KL)")
    mean = float(data.mean())
    if data.size == 1:
        return Estimate(value=mean, units=1)
    levels = [level] if fail_level is None else [level, fail_level]
    if np.ptp(data) == 0:
        cis = [Interval(low=mean, high=mean, level=lv, method="constant") for lv in levels]
    else:
        cis = _wider_bounds(data, np.random.default_rng(seed), levels, resamples)
    return Estimate(value=mean, ci=cis[0], fail_ci=cis[1] if fail_level is not None else None, units=int(data.size))


def _wider_bounds(data: np.ndarray, rng: np.random.Generator, levels: list[float], resamples: int) -> list[Interval]:
    """At each level: the lower of the two methods' lower bounds and the higher of their upper bounds."""
    pivots = _studentized_pivots(data, rng, resamples)
    log_means = _log_mean_pivots(data, rng)
    mean, standard_error = data.mean(), data.std(ddof=1) / np.sqrt(data.size)
    method = "bootstrap-t" if log_means is None else "bootstrap-t|delta-lognormal"
    intervals = []
    for level in levels:
        tail = (1 - level) / 2
        low = mean - np.quantile(pivots, 1 - tail) * standard_error
        high = mean - np.quantile(pivots, tail) * standard_error
        if log_means is not None:
            low = min(low, np.exp(np.quantile(log_means, tail)))
            high = max(high, np.exp(np.quantile(log_means, 1 - tail)))
        # The lognormal part's bound overflows on a few tiny, scattered values (KL 0 .. 1e-12 .. 1e-3): capped to the
        # largest float, which JSON keeps (inf would be written as null) and which no limit passes.
        intervals.append(
            Interval(low=max(float(low), 0.0), high=min(float(high), MAX_BOUND), level=level, method=method)
        )
    return intervals
