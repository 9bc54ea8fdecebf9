"""The verdict rules on variants built from synthetic per-item data through the stats functions."""

from __future__ import annotations

import numpy as np
import pytest

from quantcheck.analysis import format as fmt
from quantcheck.analysis.summarize import cost_comparison, merge_cost_rounds
from quantcheck.analysis.verdict import FAMILYWISE_LEVEL, RERUN_ADVICE, decide, fail_level, quality_check_count
from quantcheck.schema.results import (
    CostComparison,
    DivergenceSummary,
    GenerationCost,
    LatencyPoint,
    ModelCost,
    ModelResult,
    PairedComparison,
    Phase,
    Thresholds,
    TokenAgreement,
    WeightMemory,
)
from quantcheck.stats.intervals import bootstrap_mean, heavy_tailed_mean, proportion
from quantcheck.stats.paired import compare_paired

SEED = 1234
Table = tuple[int, int, int, int]


def paired(table: Table, level: float) -> PairedComparison:
    """A paired comparison from per-item answers; the key is always A, a wrong answer is B."""
    both_right, ref_only, variant_only, both_wrong = table
    cells = [(True, True)] * both_right + [(True, False)] * ref_only
    cells += [(False, True)] * variant_only + [(False, False)] * both_wrong
    reference_correct = [ref for ref, _ in cells]
    variant_correct = [var for _, var in cells]
    return compare_paired(
        reference_correct,
        variant_correct,
        ["A" if ok else "B" for ok in reference_correct],
        ["A" if ok else "B" for ok in variant_correct],
        fail_level=level,
    )


def agreement(kl_values: np.ndarray, top1_agrees: np.ndarray, level: float) -> TokenAgreement:
    """Next-token agreement summarised from per-item KL values and top-1 matches, as summarize does."""
    return TokenAgreement(
        n=len(kl_values),
        jaccard={5: bootstrap_mean(top1_agrees.astype(float), seed=SEED)},
        top1_agreement=proportion(top1_agrees.tolist(), fail_level=level),
        kl=DivergenceSummary(
            mean=heavy_tailed_mean(kl_values, seed=SEED, fail_level=level),
            median=float(np.median(kl_values)),
            p90=float(np.quantile(kl_values, 0.9)),
            max=float(kl_values.max()),
        ),
    )


def cost(saving: float, latency: dict[int, float] | None = None, decode: float | None = 1.0) -> CostComparison:
    return CostComparison(
        weight_memory_ratio=1 - saving,
        memory_saving=saving,
        latency_ratio=latency or {1: 1.0},
        decode_speedup=decode,
    )


def variant(
    loglik: Table | None = None,
    generative: Table | None = None,
    next_token: tuple[np.ndarray, np.ndarray] | None = None,
    cost_vs_reference: CostComparison | None = None,
    incomplete: dict[Phase, str] | None = None,
) -> ModelResult:
    """A variant measured like summarize measures one: every interval at the verdict's levels."""
    level = fail_level(quality_check_count(loglik is not None, generative is not None, next_token is not None))
    return ModelResult(
        name="test-variant",
        description="synthetic",
        status="ok",
        paired_loglik=None if loglik is None else paired(loglik, level),
        paired_generative=None if generative is None else paired(generative, level),
        agreement=None if next_token is None else agreement(*next_token, level),
        cost_vs_reference=cost_vs_reference,
        incomplete=incomplete or {},
    )


def small_kl(n: int, mean: float) -> np.ndarray:
    return np.random.default_rng(SEED).exponential(mean, size=n)


def top1(n: int, agreeing: int) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[:agreeing] = True
    return np.random.default_rng(SEED).permutation(flags)


def none_like() -> ModelResult:
    """The reference loaded again: identical answers, no flips, KL 0, full agreement, no saving."""
    n = 200
    return variant(
        loglik=(120, 0, 0, 80),
        generative=(110, 0, 0, 90),
        next_token=(np.zeros(n), np.ones(n, dtype=bool)),
        cost_vs_reference=cost(0.0),
    )


def clearly_good(**changes: object) -> ModelResult:
    n = 2000
    measured: dict[str, object] = dict(
        loglik=(1180, 20, 20, 780),
        generative=(1100, 25, 22, 853),
        next_token=(small_kl(n, 0.01), top1(n, 1950)),
        cost_vs_reference=cost(0.62, latency={1: 1.4, 8: 0.95}, decode=0.7),
    )
    return variant(**{**measured, **changes})


def test_none_like_is_rejected_only_for_memory() -> None:
    verdict = decide(none_like(), Thresholds())
    assert verdict.decision == "DON'T QUANTIZE"
    assert "saves no weight memory" in verdict.reasons[0]
    assert "memory" in verdict.summary
    assert verdict.checks == {
        "memory": "fail",
        "log-likelihood accuracy": "pass",
        "generated-answer accuracy": "pass",
        "mean KL": "pass",
        "top-1 agreement": "pass",
    }


def test_none_like_without_memory_requirement_is_not_rejected() -> None:
    verdict = decide(none_like(), Thresholds(min_memory_saving=0))
    assert verdict.decision == "QUANTIZE"


def test_clearly_good_variant() -> None:
    good = clearly_good()
    verdict = decide(good, Thresholds())
    assert verdict.decision == "QUANTIZE"
    assert "saves 62% of weight memory" in verdict.reasons
    assert "generation (decode) 1.43\u00d7 slower" in verdict.reasons
    reasons = verdict.reasons
    kl = good.agreement.kl.mean
    assert (
        f"mean KL {fmt.nats(kl.value)} nats (95% CI {fmt.interval(kl.ci, 'nats')}): within the 0.0500 nats limit"
        in reasons
    )
    assert any(r.startswith("log-likelihood accuracy +0.0 pts (95% CI [") for r in reasons)
    assert verdict.summary.count(".") == 1 and verdict.summary.endswith(".")


def test_numbers_read_as_in_the_report() -> None:
    """One formatter: the verdict's numbers are analysis/format.py's, not a second style."""
    bad = variant(loglik=(70, 50, 5, 75), generative=(70, 50, 5, 75), cost_vs_reference=cost(0.75))
    verdict = decide(bad, Thresholds())
    pl = bad.paired_loglik
    expected = (
        f"log-likelihood accuracy {fmt.points(pl.difference)} (95% CI {fmt.interval(pl.difference_ci, 'points')}; "
        f"97.5% CI {fmt.interval(pl.difference_fail_ci, 'points')}), McNemar p {fmt.pvalue(pl.mcnemar_p)}, "
        "50 right-to-wrong and 5 wrong-to-right of 200 questions: worse by more than the 2.0 pts limit"
    )
    assert expected in verdict.reasons
    assert fmt.pvalue(pl.mcnemar_p) == "<0.001"
    assert "\u2212" not in " ".join(verdict.reasons)  # no second minus sign style


def test_clearly_bad_variant() -> None:
    n = 200
    verdict = decide(
        variant(loglik=(70, 50, 5, 75), next_token=(small_kl(n, 0.4), top1(n, 140)), cost_vs_reference=cost(0.75)),
        Thresholds(),
    )
    assert verdict.decision == "DON'T QUANTIZE"
    assert any("worse by more than the 2.0 pts limit" in r for r in verdict.reasons)
    assert any("above the 0.0500 nats limit" in r for r in verdict.reasons)
    assert any("below the 90.0% minimum" in r for r in verdict.reasons)
    assert "generated-answer accuracy against the reference was not measured" in verdict.reasons
    assert verdict.summary.endswith("(family-wise 95%).")


@pytest.mark.parametrize("failing", ["accuracy", "kl", "top1"])
def test_each_quality_rule_alone_rejects(failing: str) -> None:
    n = 2000
    kl = small_kl(n, 0.4 if failing == "kl" else 0.005)
    agrees = top1(n, 1500 if failing == "top1" else 1980)
    loglik = (1000, 200, 20, 780) if failing == "accuracy" else (1180, 20, 20, 780)
    result = variant(loglik=loglik, next_token=(kl, agrees), cost_vs_reference=cost(0.5))
    assert decide(result, Thresholds()).decision == "DON'T QUANTIZE"


def test_thin_evidence_is_inconclusive_with_advice() -> None:
    n = 166
    thin = variant(loglik=(100, 12, 10, 44), next_token=(small_kl(n, 0.01), top1(n, 163)), cost_vs_reference=cost(0.5))
    verdict = decide(thin, Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    mde = fmt.points(thin.paired_loglik.min_detectable_difference).lstrip("+")
    advice = (
        f"166 questions can only detect differences of {mde} or more: "
        "run with more questions (--dataset mmlu:all) to decide"
    )
    assert 7 <= thin.paired_loglik.min_detectable_difference * 100 <= 11
    assert advice in verdict.reasons
    assert advice in verdict.summary
    assert any("is not ruled out" in r for r in verdict.reasons)


def test_top1_agreement_is_a_wilson_proportion() -> None:
    """48 of 50 agreeing does not show 90 %: Wilson's low end is 0.865 (the percentile bootstrap said 0.90)."""
    result = variant(next_token=(small_kl(50, 0.001), np.array([True] * 48 + [False] * 2)), cost_vs_reference=cost(0.5))
    top = result.agreement.top1_agreement
    assert top.ci.method == "wilson" and top.ci.low == pytest.approx(0.8654, abs=1e-4)
    verdict = decide(result, Thresholds())
    assert verdict.checks["top-1 agreement"] == "unclear"
    assert verdict.decision == "INCONCLUSIVE"


def test_no_quality_evidence_is_inconclusive() -> None:
    verdict = decide(variant(cost_vs_reference=cost(0.6)), Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert "next-token agreement (KL, top-1) was not measured" in verdict.reasons
    assert "log-likelihood accuracy against the reference was not measured" in verdict.reasons
    assert "no quality evidence" in verdict.summary
    assert verdict.fail_level is None


def test_no_evidence_but_no_saving_is_still_rejected() -> None:
    assert decide(variant(cost_vs_reference=cost(0.05)), Thresholds()).decision == "DON'T QUANTIZE"


def test_unmeasured_memory_blocks_quantize() -> None:
    n = 2000
    result = variant(loglik=(1180, 20, 20, 780), next_token=(small_kl(n, 0.005), top1(n, 1980)))
    verdict = decide(result, Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert "weight memory was not measured" in verdict.reasons
    assert "measure the cost" in verdict.summary


def test_larger_variant_says_it_uses_more_memory() -> None:
    verdict = decide(variant(cost_vs_reference=cost(-0.1)), Thresholds())
    assert verdict.decision == "DON'T QUANTIZE"
    assert verdict.reasons[0].startswith("uses 10% more weight memory than the reference")


# --- a check that was asked for but failed -----------------------------------------------------

CRASHED_GENERATION = (
    "generative scoring stopped after 40 of 2000 questions (quality job: out of memory: CUDA out of memory)"
)


@pytest.mark.parametrize(
    ("phase", "gap", "not_judged"),
    [
        ("generation", CRASHED_GENERATION, {"generated-answer accuracy"}),
        (
            "loglik",
            "log-likelihood scoring stopped after 1200 of 2000 questions, a biased subset",
            {"log-likelihood accuracy", "mean KL", "top-1 agreement"},
        ),
        ("cost", "cost was not measured (cost job: out of memory: CUDA out of memory)", set()),
    ],
)
def test_an_incomplete_phase_blocks_quantize(phase: Phase, gap: str, not_judged: set[str]) -> None:
    """Everything that was measured passes, but a phase that was asked for is missing or partial."""
    assert decide(clearly_good(), Thresholds()).decision == "QUANTIZE"
    changes: dict[str, object] = {"incomplete": {phase: gap}}
    if phase == "cost":
        changes["cost_vs_reference"] = None
    verdict = decide(clearly_good(**changes), Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert any(reason.startswith(gap) for reason in verdict.reasons)
    assert not_judged.isdisjoint(verdict.checks)
    assert RERUN_ADVICE in verdict.summary


def test_an_incomplete_phase_does_not_hide_a_measured_failure() -> None:
    """The memory saving is measured and too small: that still rejects, whatever else is missing."""
    result = clearly_good(cost_vs_reference=cost(0.05), incomplete={"generation": CRASHED_GENERATION})
    assert decide(result, Thresholds()).decision == "DON'T QUANTIZE"


# --- several checks, one error rate -----------------------------------------------------------


def test_fail_intervals_are_bonferroni_over_the_measured_checks() -> None:
    assert quality_check_count(True, True, True) == 4
    assert fail_level(4) == pytest.approx(1 - 0.05 / 4)
    good = clearly_good()
    verdict = decide(good, Thresholds())
    assert verdict.familywise_level == FAMILYWISE_LEVEL == 0.95
    assert verdict.fail_level == pytest.approx(0.9875)
    for ci in (
        good.paired_loglik.difference_fail_ci,
        good.agreement.kl.mean.fail_ci,
        good.agreement.top1_agreement.fail_ci,
    ):
        assert ci.level == pytest.approx(0.9875)
    assert (
        "a quality check fails only when its 98.75% interval lies beyond the limit: "
        "Bonferroni over 4 quality checks keeps the family-wise level at 95%"
    ) in verdict.reasons


def test_a_fail_at_95_percent_alone_is_not_a_rejection() -> None:
    """84 of 100 agreeing: the 95 % Wilson interval ends below 90 %, the 98.75 % one does not.

    Judged at 95 % each, four checks would wrongly reject a variant up to 4 x 2.5 % of the time.
    """
    result = clearly_good(next_token=(small_kl(100, 0.001), top1(100, 84)))
    top = result.agreement.top1_agreement
    assert top.ci.high < 0.90 <= top.fail_ci.high
    verdict = decide(result, Thresholds())
    assert verdict.checks["top-1 agreement"] == "unclear"
    assert verdict.decision == "INCONCLUSIVE"
    assert any("below the 90.0% minimum at 95% but not at the family-wise 98.75%" in r for r in verdict.reasons)
    fewer = clearly_good(next_token=(small_kl(100, 0.001), top1(100, 80)))
    assert decide(fewer, Thresholds()).checks["top-1 agreement"] == "fail"


def test_a_stale_interval_level_is_refused() -> None:
    """An interval computed for another number of checks cannot silently decide."""
    result = clearly_good()
    result.paired_generative = None  # three checks now: the stored 98.75 % intervals are stale
    with pytest.raises(ValueError, match="98.33%"):
        decide(result, Thresholds())


# --- speed -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latency", "note"),
    [
        (
            {1: 1.4, 2: 1.3, 4: 1.5, 8: 1.35, 16: 1.3, 32: 1.32},
            "forward pass 1.30\u00d7-1.50\u00d7 slower at batch sizes 1-32",
        ),
        ({1: 0.75, 8: 0.5}, "forward pass 1.33\u00d7-2.00\u00d7 faster at batch sizes 1-8"),
        ({1: 1.3, 16: 1 / 1.3}, "forward pass between 1.30\u00d7 faster and 1.30\u00d7 slower at batch sizes 1-16"),
        ({1: 1.4}, "forward pass 1.40\u00d7 slower at batch size 1"),
        # 1.2x and 1.15x are within the drift tolerance (1.25x): claimed only where beyond it, the rest said to be noise
        ({1: 1.4, 2: 1.3, 4: 1.2, 8: 1.15, 16: 1.05}, "forward pass 1.30\u00d7-1.40\u00d7 slower at batch sizes 1, 2"),
    ],
)
def test_speed_is_one_line(latency: dict[int, float], note: str) -> None:
    verdict = decide(variant(cost_vs_reference=cost(0.6, latency=latency)), Thresholds())
    assert note in verdict.reasons
    assert sum(reason.startswith("forward pass") and "timing noise" not in reason for reason in verdict.reasons) == 1


def test_speed_within_noise_is_not_mentioned() -> None:
    verdict = decide(variant(cost_vs_reference=cost(0.6, latency={1: 1.05, 8: 0.95}, decode=1.02)), Thresholds())
    assert not any("forward pass" in r or "decode" in r for r in verdict.reasons)


def cost_round(
    weight_bytes: int,
    medians: dict[int, float],
    disturbed: tuple[int, ...] = (),
    times: dict[int, list[float]] | None = None,
    decode: float | None = None,
) -> ModelCost:
    """One model's cost round as a worker writes it: counted weights, one latency median per batch size (with its timed
    iterations where `times` has them), the batch sizes that other load disturbed, a decode rate."""
    weights = WeightMemory(
        counted_bytes=weight_bytes,
        footprint_bytes=weight_bytes,
        parameters=10**6,
        bits_per_parameter=8 * weight_bytes / 10**6,
        footprint_agrees=True,
    )
    times = times or {}
    points = [
        LatencyPoint(
            batch_size=size,
            seq_len=16,
            status="ok",
            iterations=len(times.get(size, [])) or 3,
            median_s=float(np.median(times[size])) if size in times else median,
            disturbed=size in disturbed,
            **({"times_s": times[size]} if size in times else {}),
        )
        for size, median in medians.items()
    ]
    generation = (
        None
        if decode is None
        else GenerationCost(
            prompts=2,
            new_tokens=16,
            prefill_s=0.1,
            time_to_first_token_s=0.1,
            decode_tokens_per_s=decode,
            tokens_per_s=decode,
        )
    )
    return ModelCost(
        memory_method="counted", threads=2, load_time_s=1.0, weights=weights, latency=points, generation=generation
    )


def test_a_ratio_whose_rounds_moved_is_flagged_and_not_called_slower() -> None:
    """CI's numbers for the identity variant: load slowed both its rounds at batch 4 (0.748 s, then 1.339 s) and
    neither of the reference's. The ratio (2.27) is kept, flagged, and no speed claim is made from it."""
    reference = merge_cost_rounds([cost_round(1000, {1: 0.243, 4: 0.330}), cost_round(1000, {1: 0.250, 4: 0.335})])
    moved = merge_cost_rounds([cost_round(1000, {1: 0.243, 4: 0.748}), cost_round(1000, {1: 0.324, 4: 1.339})])
    assert [point.round_medians_s for point in moved.latency] == [[0.243, 0.324], [0.748, 1.339]]
    comparison = cost_comparison(reference, moved)
    assert comparison.latency_ratio == pytest.approx({1: 1.0, 4: 0.748 / 0.330})  # each model's fastest round
    assert comparison.unstable_batch_sizes == [1, 4]  # 0.324 / 0.243 and 1.339 / 0.748 both exceed 1.25
    reasons = decide(variant(cost_vs_reference=comparison), Thresholds()).reasons
    assert (
        "forward-pass timing at batch size 1, 4 was disturbed by other load on the machine "
        "(measured, or seen as a move between "
        "cost rounds): not called faster or slower there"
    ) in reasons
    assert not any(reason.startswith("forward pass") for reason in reasons)
    steady = cost_comparison(
        reference, merge_cost_rounds([cost_round(600, {1: 0.36, 4: 0.50}), cost_round(600, {1: 0.37, 4: 0.52})])
    )
    assert steady.unstable_batch_sizes == []
    reasons = decide(variant(cost_vs_reference=steady), Thresholds()).reasons
    assert any(
        reason.startswith("forward pass 1.48\u00d7-1.52\u00d7 slower at batch sizes 1-4 (95% CIs") for reason in reasons
    ), reasons


def test_a_disturbed_round_is_not_used_and_a_batch_size_disturbed_in_every_round_is_flagged() -> None:
    """The last CI miss: load spanned both of the identical variant's rounds at batch 1 (219 and 234 ms against 172 and
    158) and they agreed with each other. Measured as disturbed, they are not called slower; a clean round is preferred
    even when a disturbed one came out faster, and a disturbed round's median does not count as drift."""
    reference = merge_cost_rounds(
        [cost_round(1000, {1: 0.172, 4: 0.296}), cost_round(1000, {1: 0.158, 4: 0.250}, disturbed=(4,))]
    )
    assert [point.round_disturbed for point in reference.latency] == [[False, False], [False, True]]
    assert [point.median_s for point in reference.latency] == [
        0.158,
        0.296,
    ]  # batch 4: the undisturbed round, though slower
    assert not any(point.disturbed for point in reference.latency)
    identical = merge_cost_rounds(
        [
            cost_round(1000, {1: 0.219, 4: 0.300}, disturbed=(1,)),
            cost_round(1000, {1: 0.234, 4: 0.420}, disturbed=(1, 4)),
        ]
    )
    assert [point.disturbed for point in identical.latency] == [True, False]
    comparison = cost_comparison(reference, identical)
    assert comparison.latency_ratio == pytest.approx({1: 0.219 / 0.158, 4: 0.300 / 0.296})
    assert comparison.unstable_batch_sizes == [1]  # batch 4: 0.420 was disturbed, so no drift between clean rounds
    reasons = decide(variant(cost_vs_reference=comparison), Thresholds()).reasons
    assert any("at batch size 1 was disturbed by other load" in reason for reason in reasons), reasons
    assert not any(reason.startswith("forward pass") for reason in reasons)


def speed_reasons(comparison: CostComparison) -> list[str]:
    return [
        reason
        for reason in decide(variant(cost_vs_reference=comparison), Thresholds()).reasons
        if "forward pass" in reason or "decode" in reason
    ]


def test_rounds_that_overlap_are_not_called_faster() -> None:
    """Issue 24's example: the reference's rounds took 1.00 and 1.20 s, the variant's 0.96 and 0.80 s. Neither model
    moved by more than the drift tolerance, so the old rule called the variant 1.25x faster from each one's fastest
    round, although one round of each (1.00 against 0.96) says they are the same model. The ratio's interval covers
    every ratio between one round of each, and no claim is made from it."""
    reference = merge_cost_rounds(
        [cost_round(1000, {1: 1.00}, decode=100.0), cost_round(1000, {1: 1.20}, decode=100 / 1.2)]
    )
    variant_ = merge_cost_rounds([cost_round(600, {1: 0.96}, decode=104.0), cost_round(600, {1: 0.80}, decode=125.0)])
    comparison = cost_comparison(reference, variant_)
    assert comparison.latency_ratio == pytest.approx({1: 0.80})
    assert comparison.unstable_batch_sizes == [] and not comparison.decode_unstable  # each model within 1.25x
    reasons = speed_reasons(comparison)
    assert not any("faster" in reason and "timing noise" not in reason for reason in reasons), reasons
    ci = comparison.latency_ratio_ci[1]
    assert ci.low <= 0.80 / 1.20 + 1e-9 and ci.high >= 0.96 - 1e-9, ci  # one round of each: 0.96 / 1.00 ... 0.80 / 1.20
    assert comparison.latency_round_spread[1] == pytest.approx(1.20)
    assert comparison.decode_speedup == pytest.approx(1.25)
    assert comparison.decode_speedup_ci.low <= 1.04 + 1e-9 and comparison.decode_speedup_ci.high >= 1.5 - 1e-9
    assert any(reason.startswith("forward pass within timing noise at batch size 1") for reason in reasons), reasons
    assert any(reason.startswith("generation (decode) within timing noise") for reason in reasons), reasons


def test_a_speed_claim_needs_more_than_the_drift_tolerance() -> None:
    """One round each (nothing to compare between rounds): 1.14x is within what identical processes move by between
    rounds on a VM (the drift tolerance, 1.25x), so it is not a claim; 1.43x is."""
    one_round = cost_comparison(
        merge_cost_rounds([cost_round(1000, {1: 1.00, 8: 1.00}, decode=100.0)]),
        merge_cost_rounds([cost_round(600, {1: 0.88, 8: 0.70}, decode=112.0)]),
    )
    reasons = speed_reasons(one_round)
    assert "forward pass 1.43\u00d7 faster at batch size 8 (95% CI 1.43\u00d7-1.43\u00d7)" in reasons, reasons
    assert not any("1.14" in reason and "timing noise" not in reason for reason in reasons), reasons
    assert not any(reason.startswith("generation (decode) 1.12") for reason in reasons), reasons
    assert speed_reasons(cost(0.6, latency={1: 1.15, 2: 1 / 1.2}, decode=1.2)) == [
        "forward pass within timing noise at batch sizes 1, 2: "
        "variant / reference latency 1.15 at batch 1, 0.83 at batch 2; "
        "not called faster or slower (a claim needs the whole 95% interval beyond 1.25\u00d7, "
        "what one model's cost rounds "
        "can move by)",
        "generation (decode) within timing noise: 1.20\u00d7 the reference's decode rate; "
        "not called faster or slower (a claim "
        "needs the whole 95% interval beyond 1.25\u00d7, what one model's cost rounds can move by)",
    ]


def steady(center: float, spread: float, n: int = 9) -> list[float]:
    """`n` timed iterations evenly spread by +-`spread` around `center` (median `center`)."""
    return [float(t) for t in np.linspace(center * (1 - spread), center * (1 + spread), n)]


def test_the_interval_resamples_the_timed_iterations_of_each_round() -> None:
    """Two rounds of each model whose medians agree: the interval comes from resampling each round's iterations.
    Tight iterations give a tight interval and a claim; iterations that scatter by +-40 % give a wide one and none,
    though the medians are the same."""

    def comparison(scatter: float) -> CostComparison:
        reference = merge_cost_rounds(
            [
                cost_round(1000, {1: 0}, times={1: steady(1.00, scatter)}),
                cost_round(1000, {1: 0}, times={1: steady(1.02, scatter)}),
            ]
        )
        variant_ = merge_cost_rounds(
            [
                cost_round(600, {1: 0}, times={1: steady(0.66, scatter)}),
                cost_round(600, {1: 0}, times={1: steady(0.67, scatter)}),
            ]
        )
        assert [len(times) for times in reference.latency[0].round_times_s] == [9, 9]
        return cost_comparison(reference, variant_)

    tight = comparison(0.02)
    assert tight.latency_ratio[1] == pytest.approx(0.66)
    ci = tight.latency_ratio_ci[1]
    assert 0.60 < ci.low < 0.66 < ci.high < 0.70 and ci.level == 0.95 and "bootstrap" in ci.method, ci
    assert speed_reasons(tight)[0].startswith("forward pass 1.52\u00d7 faster at batch size 1 (95% CI"), speed_reasons(
        tight
    )
    loose = comparison(0.40)
    assert loose.latency_ratio[1] == pytest.approx(0.66)
    assert loose.latency_ratio_ci[1].high > 0.8, loose.latency_ratio_ci  # reaches inside the drift tolerance
    assert speed_reasons(loose)[0].startswith("forward pass within timing noise at batch size 1"), speed_reasons(loose)
    round_trip = CostComparison.model_validate_json(tight.model_dump_json())
    assert round_trip.latency_ratio_ci == tight.latency_ratio_ci


def compact_store(result: ModelResult, lower_values: np.ndarray) -> ModelResult:
    """The same variant measured from a compact reference store: per-item lower bounds beside the estimates."""
    level = result.agreement.kl.mean.fail_ci.level
    kl = result.agreement.kl.model_copy(
        update={
            "store": "compact",
            "lower": heavy_tailed_mean(lower_values, seed=SEED, fail_level=level),
            "upper_mean": 1.5,
        }
    )
    return result.model_copy(update={"agreement": result.agreement.model_copy(update={"kl": kl})})


def test_compact_store_kl_passes_on_the_estimate_and_fails_only_on_the_lower_bound() -> None:
    n = 2000
    good = compact_store(clearly_good(), 0.9 * small_kl(n, 0.01))
    assert (
        decide(good, Thresholds()).checks["mean KL"] == "pass"
    )  # the loose upper bound (1.5 nats) does not hold it back

    def kl_check(mean: float, lower_share: float) -> tuple[str, list[str]]:
        result = variant(
            loglik=(1180, 20, 20, 780), next_token=(small_kl(n, mean), top1(n, 1980)), cost_vs_reference=cost(0.5)
        )
        verdict = decide(compact_store(result, lower_share * small_kl(n, mean)), Thresholds())
        return verdict.checks["mean KL"], [reason for reason in verdict.reasons if reason.startswith("mean KL")]

    assert kl_check(0.4, 0.9)[0] == "fail"
    outcome, (reason,) = kl_check(0.058, 0.8)  # the estimate is above the limit, the lower bound is not surely
    assert outcome == "unclear"
    assert (
        "lower bound's 98.33% CI [" in reason
        and "estimated from the compact reference store (lower bound 0.0" in reason
    )
    exact = variant(
        loglik=(1180, 20, 20, 780), next_token=(small_kl(n, 0.058), top1(n, 1980)), cost_vs_reference=cost(0.5)
    )
    assert (
        decide(exact, Thresholds()).checks["mean KL"] == "fail"
    )  # the same estimates from a full store: exact, so they fail


# --- thin evidence is never a pass (#24) ------------------------------------------------------


def test_two_text_windows_are_not_quantize() -> None:
    """Defect 2: two windows gave a zero-width interval ("95 % CI [0.0194, 0.0194]") and QUANTIZE. Below MIN_UNITS
    every check is unclear whatever its interval, and the reason names the count."""
    windows = np.array([0.0194, 0.0194])
    two = variant(next_token=(windows, np.array([True, True])), cost_vs_reference=cost(0.6))
    verdict = decide(two, Thresholds(), unit="windows")
    assert verdict.decision == "INCONCLUSIVE"
    assert verdict.checks["mean KL"] == verdict.checks["top-1 agreement"] == "unclear"
    assert any("only 2 windows, fewer than the 10" in reason for reason in verdict.reasons)


def test_four_questions_are_inconclusive_however_clean() -> None:
    """The README's compare(limit=4): four identical answers and a tiny KL are too little to pass."""
    four = variant(
        loglik=(3, 0, 0, 1), next_token=(np.full(4, 1e-4), np.ones(4, dtype=bool)), cost_vs_reference=cost(0.6)
    )
    verdict = decide(four, Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert set(verdict.checks.values()) == {"pass", "unclear"} and verdict.checks["memory"] == "pass"
    assert any("only 4 questions" in reason for reason in verdict.reasons)


def test_the_numeric_floor_stops_kl_and_top1_checks_it_could_decide() -> None:
    """Defect 3: the numeric floor was measured but never read. Where the engine's own noise reaches a quarter of the KL
    limit, the KL and top-1 checks are unclear; a floor far below it changes nothing."""
    from quantcheck.schema.results import NumericFloor

    good = clearly_good()
    assert decide(good, Thresholds()).decision == "QUANTIZE"
    quiet = NumericFloor(n=166, batch_size=1, kl_mean=1e-5, kl_max=1e-4, top1_agreement=1.0, answer_agreement=1.0)
    assert decide(good, Thresholds(), numeric_floor=quiet).decision == "QUANTIZE"
    noisy = quiet.model_copy(update={"kl_mean": 0.0125})  # a quarter of the 0.05 limit
    verdict = decide(good, Thresholds(), numeric_floor=noisy)
    assert verdict.decision == "INCONCLUSIVE"
    assert verdict.checks["mean KL"] == verdict.checks["top-1 agreement"] == "unclear"
    assert any("engine's own numeric noise" in reason for reason in verdict.reasons)
    bad = clearly_good(next_token=(small_kl(2000, 0.2), top1(2000, 1950)))
    assert decide(bad, Thresholds(), numeric_floor=quiet).checks["mean KL"] == "fail"
    assert (
        decide(bad, Thresholds(), numeric_floor=quiet.model_copy(update={"kl_mean": 0.06})).checks["mean KL"]
        == "unclear"
    )
    # A floor that is coarse for the limit stops a pass, not a failure far beyond what the noise explains.
    assert decide(bad, Thresholds(), numeric_floor=noisy).checks["mean KL"] == "fail"


def test_accuracy_alone_cannot_pass_where_next_token_checks_exist() -> None:
    """Defect 8: where the tokenizers differ on questions, KL and top-1 are not measured and QUANTIZE rested on
    accuracy."""
    no_tokens = clearly_good(next_token=None)
    verdict = decide(no_tokens, Thresholds())
    assert verdict.decision == "INCONCLUSIVE" and verdict.checks["next-token agreement"] == "unclear"


def test_an_unverified_server_tokenizer_blocks_quantize() -> None:
    verdict = decide(clearly_good(), Thresholds(), unverified_tokenizers=["served-variant"])
    assert verdict.decision == "INCONCLUSIVE" and verdict.checks["tokenizer"] == "unclear"
    assert any("served-variant" in reason and "not shown to match" in reason for reason in verdict.reasons)
