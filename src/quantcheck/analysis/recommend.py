"""Which variant to serve: one recommendation across the variants of a run, from their verdicts and measurements.

The verdict judges each variant alone against the thresholds; the recommendation compares the variants with each
other. Two rules keep it honest:
- A variant *beats* another only where it is better beyond what the run measured as noise on at least one quantity
  (their intervals apart, and a KL difference beyond the engines' numeric floor, a speed difference beyond the timing
  drift) and worse beyond it on none. Anything closer is a tie, and a tie goes to the smaller weight memory.
- Only a variant whose verdict is QUANTIZE (and that fits `--fit-gb`, measured) can be recommended. When none
  passes, the answer is the reference, or "more evidence" with what would settle the inconclusive ones.
"""

from __future__ import annotations

from collections.abc import Callable

from quantcheck.analysis import format as fmt
from quantcheck.analysis.verdict import RERUN_ADVICE, noisier_floor
from quantcheck.schema.results import (
    DRIFT_TOLERANCE,
    GIB,
    Estimate,
    Interval,
    ModelResult,
    Preference,
    Recommendation,
    Results,
    Standing,
)

MEMORY_TIE = 0.01
"""Weight memory is counted exactly, but two variants within 1 % of each other save the same memory in practice."""

Comparison = Callable[[Standing, Standing], bool]


def _kl_better(a: Standing, b: Standing) -> bool:
    """a's mean KL is below b's beyond both intervals and the noisier engine floor (a lower bound never wins)."""
    if a.mean_kl is None or b.mean_kl is None or a.kl_is_lower_bound or a.mean_kl.ci is None or b.mean_kl.ci is None:
        return False
    floor = max(a.kl_floor, b.kl_floor)
    return a.mean_kl.ci.high < b.mean_kl.ci.low and b.mean_kl.value - a.mean_kl.value > floor


def _interval_better(get: Callable[[Standing], Estimate | None]) -> Comparison:
    """Lower is better, and only when the two intervals do not overlap."""

    def better(a: Standing, b: Standing) -> bool:
        ea, eb = get(a), get(b)
        return ea is not None and eb is not None and ea.ci is not None and eb.ci is not None and ea.ci.high < eb.ci.low

    return better


def _memory_better(a: Standing, b: Standing) -> bool:
    return a.weight_bytes is not None and b.weight_bytes is not None and a.weight_bytes < b.weight_bytes * (
        1 - MEMORY_TIE
    )


def _speed_better(a: Standing, b: Standing) -> bool:
    """a is faster than b by more than both intervals and the timing noise (drift tolerance, round spreads)."""
    if a.speed is None or b.speed is None or a.speed.ci is None or b.speed.ci is None:
        return False
    return a.speed.ci.low > b.speed.ci.high * max(a.speed_spread, b.speed_spread)


QUALITY: dict[str, Comparison] = {
    "mean KL": _kl_better,
    "accuracy drop": _interval_better(lambda s: s.accuracy_drop),
    "perplexity ratio": _interval_better(lambda s: s.perplexity_ratio),
}
COST: dict[str, Comparison] = {"weight memory": _memory_better, "speed": _speed_better}
PREFERRED: dict[Preference, dict[str, Comparison]] = {
    "memory": {"weight memory": _memory_better},
    "speed": {"speed": _speed_better},
    "quality": QUALITY,
}
"""What `--prefer` ranks the passing variants by, before the tie goes to the smaller weight memory."""


def beats(a: Standing, b: Standing, quantities: dict[str, Comparison] | None = None) -> bool:
    """a is better than b beyond noise on at least one quantity and worse beyond noise on none."""
    quantities = quantities if quantities is not None else QUALITY | COST
    better = any(compare(a, b) for compare in quantities.values())
    return better and not any(compare(b, a) for compare in quantities.values())


def _speed(variant: ModelResult) -> tuple[Estimate | None, float]:
    """The variant's speed relative to the reference, higher is faster: its decode rate where measured and stable,
    else its latency at the smallest stable batch size; with the noise a difference must clear."""
    cost = variant.cost_vs_reference
    if cost is None:
        return None, DRIFT_TOLERANCE
    if cost.decode_speedup is not None and not cost.decode_unstable:
        spread = max(DRIFT_TOLERANCE, cost.decode_round_spread or 1.0)
        return Estimate(value=cost.decode_speedup, ci=cost.decode_speedup_ci), spread
    stable = sorted(b for b in cost.latency_ratio if b not in cost.unstable_batch_sizes)
    if not stable:
        return None, DRIFT_TOLERANCE
    batch = stable[0]
    ratio, ci = cost.latency_ratio[batch], cost.latency_ratio_ci.get(batch)
    inverted = Interval(low=1 / ci.high, high=1 / ci.low, level=ci.level, method=ci.method) if ci else None
    return Estimate(value=1 / ratio, ci=inverted), max(DRIFT_TOLERANCE, cost.latency_round_spread.get(batch, 1.0))


def standing(variant: ModelResult, reference: ModelResult, fit_gb: float | None) -> Standing:
    """A variant's comparable quantities, taken from what the run measured (front fields are set by `recommend`)."""
    agreement, paired, corpus = variant.agreement, variant.paired_loglik, variant.corpus
    drop = None
    if paired is not None:
        ci = paired.difference_ci
        drop = Estimate(
            value=-paired.difference, ci=Interval(low=-ci.high, high=-ci.low, level=ci.level, method=ci.method)
        )
    weights = variant.cost.weight_bytes if variant.cost else None
    stated = weights is not None and variant.cost.weights is None
    speed, spread = _speed(variant)
    floor = noisier_floor(reference.engine_floor, variant.engine_floor)
    return Standing(
        name=variant.name,
        decision=variant.verdict.decision if variant.verdict else None,
        mean_kl=agreement.kl.mean if agreement else None,
        kl_is_lower_bound=bool(agreement and agreement.kl.is_lower_bound),
        accuracy_drop=drop,
        perplexity_ratio=corpus.perplexity_ratio if corpus else None,
        weight_bytes=weights,
        weight_stated=stated,
        speed=speed,
        speed_spread=spread,
        kl_floor=floor.kl_mean if floor else 0.0,
        fits=None if fit_gb is None or weights is None else weights <= fit_gb * GIB,
        on_front=True,
    )


def _smallest(standings: list[Standing]) -> Standing:
    """The tie-break: the smaller weight memory (unmeasured last), then the name, so the choice is reproducible."""
    return min(standings, key=lambda s: (s.weight_bytes is None, s.weight_bytes or 0, s.name))


def _place_on_front(standings: list[Standing]) -> None:
    for s in standings:
        beaters = [other for other in standings if other is not s and beats(other, s)]
        s.on_front = not beaters
        if beaters:
            front = [other for other in beaters if not any(beats(x, other) for x in standings)] or beaters
            s.beaten_by = _smallest(front).name
        elif s.weight_bytes is None:
            s.note = "its weight memory was not measured: on the front for quality only"
        elif s.weight_stated:
            s.note = "its weight memory is as stated (weight_gb), not measured"


def _weights_text(s: Standing) -> str:
    return fmt.nbytes(s.weight_bytes) + (" as stated" if s.weight_stated else "")


def _chosen(candidates: list[Standing], prefer: Preference) -> tuple[Standing, str]:
    """The passing variant to serve and why it, of the others that pass."""
    quantities = PREFERRED[prefer]
    best = [c for c in candidates if not any(beats(o, c, quantities) for o in candidates if o is not c)]
    choice = _smallest(best)
    others = [c for c in candidates if c is not choice]
    if not others:
        return choice, "the only variant that passes every check"
    if prefer == "memory":
        tied = [c.name for c in best if c is not choice]
        return choice, (
            "the smallest of the passing variants"
            if not tied
            else f"the smallest of the passing variants ({', '.join(tied)} within {fmt.percent(MEMORY_TIE, 0)})"
        )
    beaten = [o.name for o in others if beats(choice, o, quantities)]
    label = "faster" if prefer == "speed" else "better on quality"
    if beaten:
        return choice, f"{label} beyond the measured noise than {', '.join(beaten)}" + (
            "; the others tie with it, and it is the smallest of those" if len(beaten) < len(others) else ""
        )
    return choice, f"no passing variant is {label} beyond the measured noise, and it is the smallest"


def recommend(results: Results, prefer: Preference = "memory", fit_gb: float | None = None) -> Recommendation:
    """One answer for the run: the variant to serve, the reference, or what more evidence would decide."""
    reference = results.models[0] if results.models else None
    variants = results.models[1:]  # summarize puts the reference first
    standings = [standing(v, reference, fit_gb) for v in variants] if reference else []
    _place_on_front(standings)
    unfinished = "" if results.finished else " (the run is not finished, so this may change)"
    common = {"prefer": prefer, "fit_gb": fit_gb, "standings": standings}
    reference_name = reference.name if reference else "the reference"
    if fit_gb is not None:
        for s in standings:
            if s.fits is None and s.weight_bytes is None:
                s.note = f"its weight memory was not measured, so it cannot be shown to fit in {fit_gb:g} GiB"
    fitting = [s for s in standings if fit_gb is None or s.fits]
    candidates = [s for s in fitting if s.decision == "QUANTIZE"]
    unsettled = [s for s in fitting if s.decision in ("INCONCLUSIVE", None)]
    by_name = {v.name: v for v in variants}
    settle = list(
        dict.fromkeys(
            advice
            for s in unsettled
            for advice in (by_name[s.name].verdict.advice[:1] if by_name[s.name].verdict else [RERUN_ADVICE])
        )
    )
    budget = f" within {fit_gb:g} GiB" if fit_gb is not None else ""

    if candidates:
        choice, why = _chosen(candidates, prefer)
        details = [f"weights {_weights_text(choice)}"] if choice.weight_bytes is not None else []
        if choice.mean_kl is not None:
            details.append(f"mean KL {'≥ ' if choice.kl_is_lower_bound else ''}{fmt.nats(choice.mean_kl.value)}")
        smaller_unsettled = [
            s.name
            for s in unsettled
            if s.weight_bytes is not None and choice.weight_bytes is not None and _memory_better(s, choice)
        ]
        reason = (
            f"Serve {choice.name}: it passes every check{budget} and is {why} ({', '.join(details)})"
            if details
            else f"Serve {choice.name}: it passes every check{budget} and is {why}"
        )
        if smaller_unsettled:
            verb = "is" if len(smaller_unsettled) == 1 else "are"
            reason += f"; {', '.join(smaller_unsettled)} would be smaller but {verb} not decided yet"
        return Recommendation(
            outcome="variant", serve=choice.name, reason=reason + unfinished + ".", settle=settle, **common
        )
    if unsettled:
        thin = [s.name for s in unsettled if s.decision == "INCONCLUSIVE"]
        undecided = [s.name for s in unsettled if s.decision is None]
        parts = [f"the evidence on {', '.join(thin)} is thin"] if thin else []
        if undecided:
            parts.append(f"{', '.join(undecided)} {'has' if len(undecided) == 1 else 'have'} no verdict yet")
        reason = f"Keep serving {reference_name} for now: no variant passes yet ({'; '.join(parts)})"
        if settle:
            reason += f"; to settle it, {settle[0]}"
        return Recommendation(
            outcome="more evidence", serve=reference_name, reason=reason + unfinished + ".", settle=settle, **common
        )
    if not standings:
        reason = f"Serve {reference_name}: the run has no quantized variant"
    else:
        failing = [s.name for s in fitting]
        too_big = [s.name for s in standings if s not in fitting]
        parts = [f"{', '.join(failing)} {'fails' if len(failing) == 1 else 'fail'} a check"] if failing else []
        if too_big:
            parts.append(f"{', '.join(too_big)} {'is' if len(too_big) == 1 else 'are'} not shown to fit{budget}")
        reason = f"Serve {reference_name}: no variant passes ({'; '.join(parts)})"
    ref_bytes = reference.cost.weight_bytes if reference and reference.cost else None
    if fit_gb is not None and ref_bytes and ref_bytes > fit_gb * GIB:
        reason += f", though {reference_name} itself ({fmt.nbytes(ref_bytes)}) does not fit in {fit_gb:g} GiB either"
    return Recommendation(outcome="reference", serve=reference_name, reason=reason + unfinished + ".", **common)


FAIL_ON: dict[str, tuple[str, ...]] = {"dont": ("reference",), "inconclusive": ("reference", "more evidence")}
"""`--fail-on`'s levels: the recommendation outcomes that fail a CI gate (inconclusive is the stricter)."""
FAIL_ON_VERDICTS: dict[str, tuple[str, ...]] = {
    "dont": ("DON'T QUANTIZE",),
    "inconclusive": ("DON'T QUANTIZE", "INCONCLUSIVE"),
}
"""The same levels for one named variant's own verdict (`--fail-on dont:VARIANT`)."""


def gate_failure(results: Results, fail_on: str) -> str | None:
    """Why a release gate fails on this run, or None when it passes. `fail_on` is LEVEL (the recommendation) or
    LEVEL:VARIANT (that variant's verdict: the one a pipeline is about to ship)."""
    level, _, variant = fail_on.partition(":")
    if variant:
        model = next((model for model in results.models if model.name == variant), None)
        if model is None or model.verdict is None:
            return f"{variant} has no verdict in this run"
        return model.verdict.summary if model.verdict.decision in FAIL_ON_VERDICTS[level] else None
    if results.recommendation is None:
        return "the run made no recommendation"
    return results.recommendation.reason if results.recommendation.outcome in FAIL_ON[level] else None
