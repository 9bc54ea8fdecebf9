"""A text corpus's per-window records to llama-perplexity's statistics, with intervals over windows.

Tokens of one window share their context, so their values are correlated: every interval here
resamples whole windows (a cluster bootstrap), never single tokens. Windows hold equally many
scored tokens, so the mean over tokens is the mean of the window means; the verdict's mean KL
uses `heavy_tailed_mean` over those window means, as it does over questions.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np

from quantcheck.results.schema import CorpusStatistics, DivergenceSummary, Estimate, Interval, TokenAgreement, WindowRecord
from quantcheck.stats.intervals import bootstrap_mean, heavy_tailed_mean

KL_PERCENTILES = {"max": 100.0, "99.9": 99.9, "99": 99.0, "95": 95.0, "90": 90.0, "median": 50.0, "10": 10.0, "5": 5.0, "1": 1.0,
                  "0.1": 0.1, "min": 0.0}
DELTA_P_PERCENTILES = {"max": 100.0, "99.9": 99.9, "99": 99.0, "95": 95.0, "90": 90.0, "75": 75.0, "median": 50.0, "25": 25.0,
                       "10": 10.0, "5": 5.0, "1": 1.0, "0.1": 0.1, "min": 0.0}
"""llama-perplexity's rows, in its order."""
RESAMPLES = 1000
METHOD = "percentile bootstrap over windows"


def window_bootstrap(matrix: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], seed: int,
                     levels: tuple[float, ...]) -> tuple[np.ndarray, list[list[Interval]]]:
    """`statistic` (a vector) of the pooled [windows, tokens] values, and its intervals at each level per entry.

    One value with no spread to resample (a single window) gets no interval.
    """
    value = np.asarray(statistic(matrix.ravel()), dtype=float)
    if matrix.shape[0] < 2:
        return value, [[] for _ in value]
    rng = np.random.default_rng(seed)
    draws = np.stack([statistic(matrix[rng.integers(0, matrix.shape[0], matrix.shape[0])].ravel()) for _ in range(RESAMPLES)])
    intervals = []
    for column in range(value.size):
        intervals.append([Interval(low=float(np.percentile(draws[:, column], 50 * (1 - level))),
                                   high=float(np.percentile(draws[:, column], 50 * (1 + level))), level=level, method=METHOD)
                          for level in levels])
    return value, intervals


def _estimates(matrix: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], names: list[str], seed: int,
               fail_level: float | None = None) -> dict[str, Estimate]:
    levels = (0.95,) if fail_level is None else (0.95, fail_level)
    values, intervals = window_bootstrap(matrix, statistic, seed, levels)
    return {name: Estimate(value=float(value), ci=cis[0] if cis else None, fail_ci=cis[1] if len(cis) > 1 else None)
            for name, value, cis in zip(names, values, intervals)}


def _matrix(records: list[WindowRecord], field: str) -> np.ndarray:
    return np.array([getattr(record, field) for record in records], dtype=float)


def corpus_statistics(reference: list[WindowRecord], variant: list[WindowRecord] | None, context: int, seed: int,
                      fail_level: float | None = None) -> tuple[CorpusStatistics, TokenAgreement | None]:
    """The statistics of one model (the reference when `variant` is None), on the windows both scored,
    and for a variant compared on the reference's token ids the next-token agreement the verdict judges."""
    own = variant if variant is not None else reference
    by_window = {record.window: record for record in reference}
    own = [record for record in own if record.window in by_window]
    nll = _matrix(own, "nll")
    result = CorpusStatistics(windows=len(own), context=context, tokens=int(nll.size),
                              perplexity=_estimates(nll, lambda x: [np.exp(x.mean())], ["ppl"], seed)["ppl"])
    if variant is None or not own or own[0].kl is None:
        return result, None
    reference_nll = np.array([by_window[record.window].nll for record in own], dtype=float)
    difference = nll - reference_nll
    ratio = _estimates(difference, lambda x: [x.mean(), np.exp(x.mean())], ["log", "ratio"], seed)
    result.mean_log_ratio, result.perplexity_ratio = ratio["log"], ratio["ratio"]
    delta_p = np.exp(-nll) - np.exp(-reference_nll)
    result.delta_p = _estimates(delta_p, lambda x: [x.mean(), np.sqrt((x**2).mean()), *np.percentile(x, list(DELTA_P_PERCENTILES.values()))],
                                ["mean", "rms", *DELTA_P_PERCENTILES], seed)
    agreement = _agreement(own, seed, fail_level)
    kl = _matrix(own, "kl")
    result.kl = {"mean": agreement.kl.mean, **_estimates(kl, lambda x: np.percentile(x, list(KL_PERCENTILES.values())), list(KL_PERCENTILES), seed)}
    result.same_top1 = agreement.top1_agreement
    return result, agreement


def _agreement(records: list[WindowRecord], seed: int, fail_level: float | None) -> TokenAgreement:
    """KL, top-1 and Jaccard@k over every scored token, with intervals over windows (see the module docstring)."""
    from quantcheck.results.summarize import COMPACT_KL_METHOD

    kl = _matrix(records, "kl")
    bounded = records[0].kl_lower is not None
    lower_bound_method = records[0].kl_bound
    top1 = _matrix(records, "top1_agree")
    uppers = [value for record in records for value in record.kl_upper] if bounded else []
    return TokenAgreement(
        n=int(kl.size),
        jaccard={k: bootstrap_mean([record.jaccard[k] for record in records], seed) for k in records[0].jaccard},
        top1_agreement=_estimates(top1, lambda x: [x.mean()], ["top1"], seed, fail_level)["top1"],
        kl=DivergenceSummary(
            mean=heavy_tailed_mean(kl.mean(axis=1), seed, fail_level=fail_level),
            median=float(np.median(kl)),
            p90=float(np.percentile(kl, 90)),
            max=float(kl.max()),
            store="compact" if bounded else "full",
            lower=heavy_tailed_mean(_matrix(records, "kl_lower").mean(axis=1), seed, fail_level=fail_level)
            if bounded and not lower_bound_method else None,
            upper_mean=statistics.fmean(uppers) if bounded and None not in uppers else None,
            is_lower_bound=lower_bound_method is not None,
            method=lower_bound_method or (COMPACT_KL_METHOD if bounded else "exact over the full vocabulary"),
        ),
    )
