"""KL's summary in results.json, one way for every kind of run: questions, a text's windows, prompts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from quantcheck.schema.results import DivergenceSummary
from quantcheck.stats.intervals import heavy_tailed_mean

COMPACT_KL_METHOD = (
    "estimated from the compact reference store: its top K exactly plus the tail from its samples (unbiased), "
    "between per-item lower and upper bounds"
)


def divergence_summary(
    unit_kl: Sequence[float],
    pooled_kl: Sequence[float],
    unit_lower: Sequence[float] | None,
    uppers: Sequence[float | None],
    bound_method: str | None,
    seed: int,
    level: float | None,
) -> DivergenceSummary:
    """Mean KL with intervals over the units the verdict resamples (questions; or windows and prompts, by their
    means), median, p90 and max over every compared position.

    From a compact reference store (`unit_lower` given) KL is an estimate with bounds: the units' lower
    bounds get intervals too (a 'fail' is judged on them), the upper bounds' mean is reported. Where a
    side was known only on its top K, `bound_method` says how every value is a lower bound.
    """
    bounded = unit_lower is not None
    return DivergenceSummary(
        mean=heavy_tailed_mean(unit_kl, seed, fail_level=level),
        median=float(np.median(pooled_kl)),
        p90=float(np.percentile(pooled_kl, 90)),
        max=float(np.max(pooled_kl)),
        store="compact" if bounded else "full",
        lower=heavy_tailed_mean(unit_lower, seed, fail_level=level) if bounded and not bound_method else None,
        upper_mean=statistics.fmean(uppers) if bounded and None not in uppers else None,
        is_lower_bound=bound_method is not None,
        method=bound_method or (COMPACT_KL_METHOD if bounded else "exact over the full vocabulary"),
    )
