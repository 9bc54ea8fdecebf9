"""The recommendation's rules on constructed results: variants measured through the stats functions and judged by the
verdict, as summarize does, then compared with each other."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from quantcheck.analysis.recommend import QUALITY, beats, gate_failure, recommend
from quantcheck.analysis.verdict import decide, fail_level, quality_check_count
from quantcheck.schema.results import (
    GIB,
    CostComparison,
    Interval,
    ModelCost,
    ModelResult,
    NumericFloor,
    Results,
    Thresholds,
    WeightMemory,
)
from quantcheck.stats.paired import compare_paired
from test_verdict import agreement

SEED = 7
N = 400
REFERENCE_BYTES = 4 * GIB


def _cost(weight_bytes: int) -> ModelCost:
    return ModelCost(
        memory_method="test",
        threads=1,
        load_time_s=1.0,
        weights=WeightMemory(
            counted_bytes=weight_bytes,
            footprint_bytes=None,
            parameters=10**9,
            bits_per_parameter=8 * weight_bytes / 10**9,
            footprint_agrees=True,
        ),
    )


def measured(
    name: str,
    kl_mean: float,
    weight_fraction: float | None,
    *,
    wrong: int = 0,
    n: int = N,
    decode: tuple[float, float, float] | None = None,
) -> ModelResult:
    """A variant whose per-item KL is lognormal around `kl_mean`, that gets `wrong` of the reference's right answers
    wrong, with weights `weight_fraction` of the reference's (None: cost not measured), judged by the verdict."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    level = fail_level(quality_check_count(True, False, True))
    kl = rng.lognormal(np.log(kl_mean) - 0.5, 1.0, n)
    top1 = rng.random(n) > 0.02
    right = [True] * n
    variant_right = [i >= wrong for i in range(n)]
    paired = compare_paired(
        right, variant_right, ["A"] * n, ["A" if ok else "B" for ok in variant_right], fail_level=level
    )
    result = ModelResult(
        name=name,
        description=name,
        status="ok",
        paired_loglik=paired,
        agreement=agreement(kl, top1, level),
    )
    if weight_fraction is not None:
        result.cost = _cost(int(REFERENCE_BYTES * weight_fraction))
        speed = (
            {}
            if decode is None
            else {
                "decode_speedup": decode[0],
                "decode_speedup_ci": Interval(low=decode[1], high=decode[2], method="test"),
                "decode_round_spread": 1.0,
            }
        )
        result.cost_vs_reference = CostComparison(
            weight_memory_ratio=weight_fraction,
            memory_saving=1 - weight_fraction,
            latency_ratio={1: 1.0},
            **speed,
        )
    result.verdict = decide(result, Thresholds(), unit="questions")
    return result


def results(*variants: ModelResult) -> Results:
    reference = ModelResult(
        name="reference", role="reference", description="fp32", status="ok", cost=_cost(REFERENCE_BYTES)
    )
    return Results(tool_version="test", created_at="now", finished=True, models=[reference, *variants])


def by_name(recommendation) -> dict:
    return {s.name: s for s in recommendation.standings}


def test_a_dominated_variant_is_off_the_front_and_names_what_beats_it():
    good = measured("int8", 0.005, 0.30)
    worse = measured("nf4-big", 0.03, 0.45)
    assert good.verdict.decision == worse.verdict.decision == "QUANTIZE"
    rec = recommend(results(good, worse))
    standing = by_name(rec)
    assert standing["int8"].on_front and not standing["nf4-big"].on_front
    assert standing["nf4-big"].beaten_by == "int8"
    assert rec.outcome == "variant" and rec.serve == "int8"
    assert rec.reason.startswith("Serve int8: it passes every check")


def test_a_tie_within_noise_goes_to_the_smaller_memory():
    # Same KL distribution (intervals overlap): neither is better on quality; the smaller one is recommended even when
    # the user prefers quality.
    small = measured("small", 0.010, 0.25)
    large = measured("large", 0.010, 0.40)
    standing = by_name(recommend(results(small, large)))
    assert not beats(standing["large"], standing["small"], QUALITY)
    assert not beats(standing["small"], standing["large"], QUALITY)
    for prefer in ("memory", "quality", "speed"):
        rec = recommend(results(small, large), prefer=prefer)
        assert rec.serve == "small", prefer
    # The larger one stays on the front only if nothing beats it: the smaller one ties on quality and is smaller.
    standing = by_name(recommend(results(small, large)))
    assert standing["large"].beaten_by == "small"


def test_quality_preference_picks_the_better_variant_only_beyond_its_intervals():
    small = measured("small", 0.03, 0.25)
    large = measured("large", 0.002, 0.40)
    assert recommend(results(small, large), prefer="memory").serve == "small"
    rec = recommend(results(small, large), prefer="quality")
    assert rec.serve == "large"
    standing = by_name(rec)
    assert standing["small"].on_front and standing["large"].on_front  # each better on one quantity
    assert "better on quality beyond the measured noise than small" in rec.reason


def test_a_kl_difference_under_the_engine_floor_is_a_tie():
    small = measured("small", 0.03, 0.25)
    large = measured("large", 0.002, 0.40)
    floor = NumericFloor(n=20, batch_size=8, kl_mean=0.05, kl_max=0.2, top1_agreement=1.0)
    for variant in (small, large):
        variant.engine_floor = floor
    rec = recommend(results(small, large), prefer="quality")
    assert rec.serve == "small"  # the engines' own noise is larger than the KL gap: a tie, to the smaller
    assert by_name(rec)["large"].beaten_by == "small"


def test_speed_preference_needs_the_gap_beyond_the_timing_drift():
    slow = measured("slow", 0.01, 0.25, decode=(1.0, 0.95, 1.05))
    fast = measured("fast", 0.01, 0.40, decode=(2.0, 1.9, 2.1))
    slightly = measured("slightly", 0.01, 0.40, decode=(1.15, 1.10, 1.20))  # within the 1.25 drift tolerance
    assert recommend(results(slow, fast), prefer="speed").serve == "fast"
    assert recommend(results(slow, slightly), prefer="speed").serve == "slow"


def gated(*variants: ModelResult) -> Results:
    """A run's results with its recommendation, as `quantcheck run` writes them before `--fail-on` reads them."""
    run = results(*variants)
    run.recommendation = recommend(run)
    return run


def test_nothing_passes_means_serve_the_reference():
    bad = measured("nf2", 0.5, 0.2, wrong=60)
    also_bad = measured("fp3", 0.3, 0.3, wrong=40)
    assert {bad.verdict.decision, also_bad.verdict.decision} == {"DON'T QUANTIZE"}
    run = gated(bad, also_bad)
    rec = run.recommendation
    assert rec.outcome == "reference" and rec.serve == "reference"
    assert "no variant passes (nf2, fp3 fail a check)" in rec.reason
    assert gate_failure(run, "dont") == rec.reason
    assert gate_failure(run, "inconclusive") == rec.reason
    assert gate_failure(run, "dont:nf2") == bad.verdict.summary  # the variant a pipeline ships, by its own verdict
    assert gate_failure(run, "dont:elsewhere") == "elsewhere has no verdict in this run"


def test_a_variant_that_does_not_fit_is_never_recommended():
    small = measured("small", 0.03, 0.25)  # 1 GiB
    large = measured("large", 0.002, 0.40)  # 1.6 GiB
    rec = recommend(results(small, large), prefer="quality", fit_gb=1.2)
    assert rec.serve == "small" and by_name(rec)["large"].fits is False and by_name(rec)["small"].fits is True
    rec = recommend(results(small, large), fit_gb=0.5)
    assert rec.outcome == "reference"
    assert "small, large are not shown to fit within 0.5 GiB" in rec.reason
    assert "reference itself (4.00 GiB) does not fit in 0.5 GiB either" in rec.reason


def test_a_missing_cost_is_on_the_front_for_quality_only_and_cannot_fit_a_budget():
    served = measured("served", 0.002, None)
    local = measured("local", 0.03, 0.25)
    assert served.verdict.decision == "INCONCLUSIVE"  # memory unknown: the verdict cannot pass it
    rec = recommend(results(served, local))
    standing = by_name(rec)
    assert standing["served"].on_front and "for quality only" in standing["served"].note
    assert standing["served"].weight_bytes is None
    assert rec.serve == "local"
    rec = recommend(results(served, local), fit_gb=2)
    assert "cannot be shown to fit in 2 GiB" in by_name(rec)["served"].note


def test_thin_evidence_asks_for_more_and_fails_only_the_strict_gate():
    thin = measured("thin", 0.01, 0.25, n=6)
    assert thin.verdict.decision == "INCONCLUSIVE"
    run = gated(thin)
    rec = run.recommendation
    assert rec.outcome == "more evidence" and rec.serve == "reference"
    assert rec.settle and rec.settle[0] in rec.reason
    assert gate_failure(run, "dont") is None and gate_failure(run, "dont:thin") is None
    assert gate_failure(run, "inconclusive") == rec.reason
    assert gate_failure(run, "inconclusive:thin") == thin.verdict.summary


def test_passing_run_passes_both_gates():
    run = gated(measured("int8", 0.005, 0.30))
    assert gate_failure(run, "dont") is None and gate_failure(run, "inconclusive") is None
    assert gate_failure(run, "inconclusive:int8") is None


@pytest.mark.parametrize("outcome", ["variant", "reference"])
def test_a_results_file_round_trips_its_recommendation(outcome):
    variant = measured("int8", 0.005 if outcome == "variant" else 0.5, 0.30, wrong=0 if outcome == "variant" else 60)
    document = results(variant)
    document.recommendation = recommend(document)
    again = Results.model_validate_json(document.model_dump_json())
    assert again.recommendation == document.recommendation and again.recommendation.outcome == outcome
