"""Intervals on speed ratios (variant / reference) from cost rounds, and how far rounds of one model moved.

A merged latency point is the fastest undisturbed round's median; a decode rate the fastest undisturbed
round's. The interval on a ratio of two such figures resamples, in each undisturbed round of both models,
its timed iterations (latency) or timed prompt batches (decode), and takes the statistic as the merge does
(fastest round's median, or fastest round's pooled rate) on every resample: a percentile bootstrap. With
the default two rounds that sees only the noise inside a round, so the interval is widened to cover every
ratio between one undisturbed round of each model: the between-round spread is its floor. A round without
stored iterations (files written before they were kept) contributes its median as a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantcheck.schema.results import GenerationCost, Interval, LatencyPoint, undisturbed_rounds

LEVEL = 0.95
RESAMPLES = 2000
SEED = 20240
LATENCY_METHOD = (
    "percentile bootstrap of each undisturbed cost round's timed iterations (fastest round's median per model, "
    f"{RESAMPLES} resamples), widened to every ratio between one undisturbed round of each model"
)
ROUNDS_ONLY_METHOD = "every ratio between one undisturbed round of each model (no timed iterations stored to resample)"
DECODE_METHOD = (
    "percentile bootstrap of each undisturbed cost round's timed prompt batches (fastest round's pooled decode rate "
    f"per model, {RESAMPLES} resamples), widened to every ratio between one undisturbed round of each model"
)


def _clean(rounds: list, disturbed: list[bool], merged_disturbed: bool) -> list:
    """The undisturbed rounds' entries; every round's where all were disturbed (the merged point is then disturbed)."""
    return undisturbed_rounds(rounds, disturbed, merged_disturbed) or list(rounds)


def spread(values: Sequence[float]) -> float:
    """Largest over smallest (1.0 for fewer than two values)."""
    return max(values) / min(values) if len(values) > 1 and min(values) > 0 else 1.0


def _latency_rounds(point: LatencyPoint) -> list[tuple[float, list[float]]]:
    """(median, timed iterations) of each round the ratio may use."""
    if point.round_medians_s:
        times = (
            point.round_times_s
            if len(point.round_times_s) == len(point.round_medians_s)
            else [[]] * len(point.round_medians_s)
        )
        rounds = list(zip(point.round_medians_s, times))
    else:
        rounds = [(point.median_s, point.times_s)]
    return _clean(rounds, point.round_disturbed, point.disturbed)


def latency_round_medians(point: LatencyPoint) -> list[float]:
    """The medians of the rounds the ratio uses (undisturbed ones)."""
    return [median for median, _ in _latency_rounds(point)]


def _resampled_medians(rounds: list[tuple[float, list[float]]], rng: np.random.Generator) -> np.ndarray:
    """Per resample, the fastest round's median of its resampled iterations."""
    best = np.full(RESAMPLES, np.inf)
    for median, times in rounds:
        if len(times) < 2:
            medians = np.full(RESAMPLES, median)
        else:
            values = np.asarray(times, dtype=np.float64)
            medians = np.median(values[rng.integers(0, len(values), size=(RESAMPLES, len(values)))], axis=1)
        best = np.minimum(best, medians)
    return best


def _hull(point: float, boot: np.ndarray, cross: list[float], method: str) -> Interval:
    alpha = (1 - LEVEL) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (point, point)
    return Interval(
        low=float(min(low, point, *cross)), high=float(max(high, point, *cross)), level=LEVEL, method=method
    )


def latency_ratio_interval(reference: LatencyPoint, variant: LatencyPoint, ratio: float) -> Interval:
    """95% interval on variant / reference latency at one batch size (`ratio`: the point estimate)."""
    rng = np.random.default_rng([SEED, reference.batch_size])
    ref_rounds, var_rounds = _latency_rounds(reference), _latency_rounds(variant)
    boot = _resampled_medians(var_rounds, rng) / _resampled_medians(ref_rounds, rng)
    cross = [v / r for v, _ in var_rounds for r, _ in ref_rounds if r]
    resampled = any(len(times) > 1 for _, times in [*ref_rounds, *var_rounds])
    return _hull(ratio, boot[np.isfinite(boot)], cross, LATENCY_METHOD if resampled else ROUNDS_ONLY_METHOD)


def _decode_rounds(generation: GenerationCost) -> list[tuple[float, list[float], list[int]]]:
    """(rate, decode seconds per batch, tokens per batch) of each round the speedup may use."""
    if generation.round_decode_tokens_per_s:
        n = len(generation.round_decode_tokens_per_s)
        times = generation.round_decode_times_s if len(generation.round_decode_times_s) == n else [[]] * n
        tokens = generation.round_decode_tokens if len(generation.round_decode_tokens) == n else [[]] * n
        rounds = list(zip(generation.round_decode_tokens_per_s, times, tokens))
    else:
        rounds = [(generation.decode_tokens_per_s, generation.decode_times_s, generation.decode_tokens)]
    return _clean(rounds, generation.round_disturbed, generation.disturbed)


def decode_round_rates(generation: GenerationCost) -> list[float]:
    """The decode rates of the rounds the speedup uses (undisturbed ones)."""
    return [rate for rate, _, _ in _decode_rounds(generation)]


def _resampled_rates(rounds: list[tuple[float, list[float], list[int]]], rng: np.random.Generator) -> np.ndarray:
    """Per resample, the fastest round's pooled decode rate over its resampled prompt batches."""
    best = np.zeros(RESAMPLES)
    for rate, times, tokens in rounds:
        if len(times) < 2 or len(tokens) != len(times):
            rates = np.full(RESAMPLES, rate)
        else:
            index = rng.integers(0, len(times), size=(RESAMPLES, len(times)))
            seconds = np.asarray(times, dtype=np.float64)[index].sum(axis=1)
            decoded = np.asarray(tokens, dtype=np.float64)[index].sum(axis=1)
            rates = np.divide(decoded, seconds, out=np.full(RESAMPLES, np.inf), where=seconds > 0)
        best = np.maximum(best, rates)
    return best


def decode_speedup_interval(reference: GenerationCost, variant: GenerationCost, speedup: float) -> Interval:
    """95% interval on the variant's decode rate over the reference's (`speedup`: the point estimate)."""
    rng = np.random.default_rng([SEED, 0])
    ref_rounds, var_rounds = _decode_rounds(reference), _decode_rounds(variant)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = _resampled_rates(var_rounds, rng) / _resampled_rates(ref_rounds, rng)
    cross = [v / r for v, _, _ in var_rounds for r, _, _ in ref_rounds if r]
    resampled = any(len(times) > 1 for _, times, _ in [*ref_rounds, *var_rounds])
    return _hull(speedup, boot[np.isfinite(boot)], cross, DECODE_METHOD if resampled else ROUNDS_ONLY_METHOD)
