"""Per-sequence records (a text's windows, or prompts with the reference's answers) to llama-perplexity's
statistics, with intervals over sequences.

Tokens of one sequence share their context, so their values are correlated: every interval here
resamples whole sequences (a cluster bootstrap), never single tokens. A text's windows hold equally
many scored tokens, so the mean over tokens is the mean of the window means; the verdict's mean KL
uses `heavy_tailed_mean` over those means, as it does over questions (prompts: each prompt counts once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from quantcheck.analysis.divergence import divergence_summary
from quantcheck.schema.results import (
    CorpusStatistics,
    Estimate,
    Interval,
    PositionBucket,
    TokenAgreement,
    WindowRecord,
    WorstSpan,
)
from quantcheck.stats.intervals import bootstrap_mean

KL_PERCENTILES = {
    "max": 100.0,
    "99.9": 99.9,
    "99": 99.0,
    "95": 95.0,
    "90": 90.0,
    "median": 50.0,
    "10": 10.0,
    "5": 5.0,
    "1": 1.0,
    "0.1": 0.1,
    "min": 0.0,
}
DELTA_P_PERCENTILES = {
    "max": 100.0,
    "99.9": 99.9,
    "99": 99.0,
    "95": 95.0,
    "90": 90.0,
    "75": 75.0,
    "median": 50.0,
    "25": 25.0,
    "10": 10.0,
    "5": 5.0,
    "1": 1.0,
    "0.1": 0.1,
    "min": 0.0,
}
"""llama-perplexity's rows, in its order."""
RESAMPLES = 1000
METHOD = "percentile bootstrap over windows"


def window_bootstrap(
    groups: list[np.ndarray], statistic: Callable[[np.ndarray], Sequence[float]], seed: int, levels: tuple[float, ...]
) -> tuple[np.ndarray, list[list[Interval]]]:
    """`statistic` (a vector) of the pooled values of every group (window or prompt), and its intervals at each
    level per entry, resampling whole groups. A single group has no spread to resample: no interval."""
    value = np.asarray(statistic(np.concatenate(groups)), dtype=float)
    if len(groups) < 2:
        return value, [[] for _ in value]
    rng = np.random.default_rng(seed)
    draws = np.stack(
        [
            statistic(np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))]))
            for _ in range(RESAMPLES)
        ]
    )
    intervals = []
    for column in range(value.size):
        intervals.append(
            [
                Interval(
                    low=float(np.percentile(draws[:, column], 50 * (1 - level))),
                    high=float(np.percentile(draws[:, column], 50 * (1 + level))),
                    level=level,
                    method=METHOD,
                )
                for level in levels
            ]
        )
    return value, intervals


def _estimates(
    groups: list[np.ndarray],
    statistic: Callable[[np.ndarray], Sequence[float]],
    names: list[str],
    seed: int,
    fail_level: float | None = None,
) -> dict[str, Estimate]:
    levels = (0.95,) if fail_level is None else (0.95, fail_level)
    values, intervals = window_bootstrap(groups, statistic, seed, levels)
    return {
        name: Estimate(
            value=float(value), ci=cis[0] if cis else None, fail_ci=cis[1] if len(cis) > 1 else None, units=len(groups)
        )
        for name, value, cis in zip(names, values, intervals)
    }


def pooled_share(groups: list[np.ndarray], seed: int, fail_level: float | None) -> Estimate:
    """The share of true flags over every token (top-1 agreement), each bound the wider of the percentile bootstrap over
    sequences and a cluster-robust Student-t interval (the ratio estimator's variance over G sequences, G - 1 degrees of
    freedom). On few sequences the percentile bootstrap spans little more than the sequences' own range (about [min,
    max] at two) and undercovers; the t interval widens with the t quantile, as a verdict on thin evidence should."""
    estimate = _estimates(groups, lambda x: [x.mean()], ["share"], seed, fail_level)["share"]
    if estimate.ci is None:
        return estimate
    sizes = np.array([group.size for group in groups], dtype=float)
    means = np.array([group.mean() for group in groups])
    count = len(groups)
    standard_error = np.sqrt(count / (count - 1) * np.sum((sizes * (means - estimate.value)) ** 2)) / sizes.sum()

    def widened(ci: Interval | None) -> Interval | None:
        if ci is None:
            return None
        half = stats.t.ppf(0.5 + ci.level / 2, count - 1) * standard_error
        return Interval(
            low=max(min(ci.low, estimate.value - half), 0.0),
            high=min(max(ci.high, estimate.value + half), 1.0),
            level=ci.level,
            method=f"{METHOD}|cluster-robust t",
        )

    return estimate.model_copy(update={"ci": widened(estimate.ci), "fail_ci": widened(estimate.fail_ci)})


def _groups(records: list[WindowRecord], field: str) -> list[np.ndarray]:
    return [np.asarray(getattr(record, field), dtype=float) for record in records]


def corpus_statistics(
    reference: list[WindowRecord],
    variant: list[WindowRecord] | None,
    context: int | None,
    seed: int,
    fail_level: float | None = None,
    spans: SpanText | None = None,
) -> tuple[CorpusStatistics, TokenAgreement | None]:
    """The statistics of one model (the reference when `variant` is None) on the sequences both scored, and for a
    variant compared on the reference's token ids the next-token agreement the verdict judges. `spans` gives the
    text of the scored tokens, for the sequences where the variant departs most."""
    by_sequence = {record.window: record for record in reference if record.nll}
    own = [
        record
        for record in (variant if variant is not None else reference)
        if record.window in by_sequence and record.nll
    ]
    nll = _groups(own, "nll")
    result = CorpusStatistics(
        windows=len(own),
        context=context,
        tokens=int(sum(group.size for group in nll)),
        perplexity=_estimates(nll, lambda x: [np.exp(x.mean())], ["ppl"], seed)["ppl"],
    )
    if variant is None or not own or own[0].kl is None:
        return result, None
    reference_nll = [np.asarray(by_sequence[record.window].nll, dtype=float) for record in own]
    difference = [mine - theirs for mine, theirs in zip(nll, reference_nll)]
    ratio = _estimates(difference, lambda x: [x.mean(), np.exp(x.mean())], ["log", "ratio"], seed)
    result.mean_log_ratio, result.perplexity_ratio = ratio["log"], ratio["ratio"]
    delta_p = [np.exp(-mine) - np.exp(-theirs) for mine, theirs in zip(nll, reference_nll)]
    result.delta_p = _estimates(
        delta_p,
        lambda x: [x.mean(), np.sqrt((x**2).mean()), *np.percentile(x, list(DELTA_P_PERCENTILES.values()))],
        ["mean", "rms", *DELTA_P_PERCENTILES],
        seed,
    )
    agreement = _agreement(own, seed, fail_level)
    kl = _groups(own, "kl")
    result.kl = {
        "mean": agreement.kl.mean,
        **_estimates(kl, lambda x: np.percentile(x, list(KL_PERCENTILES.values())), list(KL_PERCENTILES), seed),
    }
    result.same_top1 = agreement.top1_agreement
    result.by_position, result.kl_growth = along_the_context(own, delta_p, seed)
    if spans is not None:
        result.worst = worst_spans(own, spans)
    return result, agreement


POSITION_BUCKETS = 8
"""Equal shares of each sequence's scored span in which KL, top-1 and delta-p are averaged along the context."""


def _shares(length: int, buckets: int) -> list[slice]:
    edges = [round(i * length / buckets) for i in range(buckets + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(buckets)]


def along_the_context(
    records: list[WindowRecord], delta_p: list[np.ndarray], seed: int, buckets: int = POSITION_BUCKETS
) -> tuple[list[PositionBucket], Estimate | None]:
    """KL, top-1 agreement and delta-p in `buckets` equal shares of each sequence's scored tokens, and the last share's
    mean KL minus the first's, paired over the sequences long enough to have both (a bootstrap over sequences)."""
    usable = [(record, dp) for record, dp in zip(records, delta_p) if record.kl and len(record.kl) >= buckets]
    if len(usable) < 2:
        return [], None
    lengths = {len(record.kl) for record, _ in usable}
    equal = len(lengths) == 1
    per_share: list[dict[str, list[np.ndarray]]] = [{"kl": [], "top1": [], "delta_p": []} for _ in range(buckets)]
    for record, dp in usable:
        kl = np.asarray(record.kl, dtype=float)
        top1 = np.asarray(record.top1_agree, dtype=float) if record.top1_agree else None
        for share, cut in zip(per_share, _shares(kl.size, buckets)):
            share["kl"].append(kl[cut])
            share["delta_p"].append(np.asarray(dp)[cut])
            if top1 is not None:
                share["top1"].append(top1[cut])
    length = lengths.pop() if equal else buckets
    result = []
    for index, (share, cut) in enumerate(zip(per_share, _shares(length, buckets))):
        mean = lambda x: [x.mean()]  # noqa: E731
        result.append(
            PositionBucket(
                start=cut.start if equal else index,
                end=cut.stop if equal else index + 1,
                tokens=int(sum(values.size for values in share["kl"])),
                kl=_estimates(share["kl"], mean, ["mean"], seed)["mean"],
                top1=_estimates(share["top1"], mean, ["mean"], seed)["mean"] if share["top1"] else None,
                delta_p=_estimates(share["delta_p"], mean, ["mean"], seed)["mean"],
            )
        )
    growth = np.array([last.mean() - first.mean() for first, last in zip(per_share[0]["kl"], per_share[-1]["kl"])])
    return result, bootstrap_mean(growth, seed=seed)


class SpanText(NamedTuple):
    """What the report shows around a token: each sequence's name and the text of its scored tokens."""

    names: list[str]
    token_texts: list[list[str]]


WORST_COUNT = 5
BEFORE, AFTER = 16, 8


def worst_spans(records: list[WindowRecord], spans: SpanText) -> list[WorstSpan]:
    """The sequences with the highest mean KL, each with the text around its highest-KL token.

    With the compact store the ranking is by the estimates (the upper bounds are too loose to rank by: about 0.75
    nats even for an identical model), and each span carries the estimates' standard errors and the worst token's
    bounds, so the report can say that the values and the order are estimated."""
    ranked = sorted(records, key=lambda record: -float(np.mean(record.kl)))[:WORST_COUNT]
    worst = []
    for record in ranked:
        position = int(np.argmax(record.kl))
        texts = spans.token_texts[record.window]
        estimated = {}
        if (
            record.kl_se is not None and None not in record.kl_se
        ):  # tokens' errors are independent: their own tail draws
            estimated = {
                "mean_kl_se": float(np.sqrt(np.sum(np.square(record.kl_se)))) / len(record.kl_se),
                "worst_kl_se": float(record.kl_se[position]),
            }
        if record.kl_lower is not None and record.kl_upper is not None:
            estimated |= {
                "worst_kl_lower": float(record.kl_lower[position]),
                "worst_kl_upper": record.kl_upper[position],
            }
        worst.append(
            WorstSpan(
                sequence=record.window,
                name=spans.names[record.window],
                tokens=len(record.kl),
                mean_kl=float(np.mean(record.kl)),
                top1_agreement=float(np.mean(record.top1_agree)),
                worst_position=position,
                worst_kl=float(record.kl[position]),
                **estimated,
                before="".join(texts[max(position - BEFORE, 0) : position]),
                token=texts[position],
                after="".join(texts[position + 1 : position + 1 + AFTER]),
            )
        )
    return worst


def _agreement(records: list[WindowRecord], seed: int, fail_level: float | None) -> TokenAgreement:
    """KL, top-1 and Jaccard@k over every scored token, with intervals over whole sequences (see the module docstring).

    Mean KL is the mean of the sequences' means: the mean over tokens for a text's equal windows; each prompt counted
    once."""
    kl = _groups(records, "kl")
    pooled = np.concatenate(kl)
    bounded = records[0].kl_lower is not None
    uppers = [value for record in records for value in record.kl_upper] if bounded else []
    return TokenAgreement(
        n=int(pooled.size),
        jaccard={k: bootstrap_mean([record.jaccard[k] for record in records], seed) for k in records[0].jaccard},
        top1_agreement=pooled_share(_groups(records, "top1_agree"), seed, fail_level),
        kl=divergence_summary(
            [group.mean() for group in kl],
            pooled,
            [group.mean() for group in _groups(records, "kl_lower")] if bounded else None,
            uppers,
            records[0].kl_bound,
            seed,
            fail_level,
        ),
    )
