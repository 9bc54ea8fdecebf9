"""The verdict rules on variants built from synthetic per-item data through the stats functions."""

from __future__ import annotations

import numpy as np
import pytest

from quantcheck.results.schema import (
    CostComparison,
    DivergenceSummary,
    ModelResult,
    PairedComparison,
    Thresholds,
    TokenAgreement,
)
from quantcheck.stats.intervals import bootstrap_mean
from quantcheck.stats.paired import compare_paired
from quantcheck.verdict import decide

SEED = 1234


def paired(both_right: int, ref_only: int, variant_only: int, both_wrong: int) -> PairedComparison:
    """A paired comparison from per-item answers; the key is always A, a wrong answer is B."""
    cells = [(True, True)] * both_right + [(True, False)] * ref_only
    cells += [(False, True)] * variant_only + [(False, False)] * both_wrong
    reference_correct = [ref for ref, _ in cells]
    variant_correct = [var for _, var in cells]
    return compare_paired(
        reference_correct,
        variant_correct,
        ["A" if ok else "B" for ok in reference_correct],
        ["A" if ok else "B" for ok in variant_correct],
    )


def agreement(kl_values: np.ndarray, top1_agrees: np.ndarray) -> TokenAgreement:
    """Next-token agreement summarised from per-item KL values and top-1 matches."""
    return TokenAgreement(
        n=len(kl_values),
        jaccard={5: bootstrap_mean(top1_agrees.astype(float), seed=SEED)},
        top1_agreement=bootstrap_mean(top1_agrees.astype(float), seed=SEED),
        kl=DivergenceSummary(
            mean=bootstrap_mean(kl_values, seed=SEED),
            median=float(np.median(kl_values)),
            p90=float(np.quantile(kl_values, 0.9)),
            max=float(kl_values.max()),
        ),
    )


def cost(
    saving: float, latency: dict[int, float] | None = None, decode: float | None = 1.0
) -> CostComparison:
    return CostComparison(
        weight_memory_ratio=1 - saving,
        memory_saving=saving,
        latency_ratio=latency or {1: 1.0},
        decode_speedup=decode,
    )


def variant(**measured: object) -> ModelResult:
    return ModelResult(name="test-variant", description="synthetic", status="ok", **measured)


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
        paired_loglik=paired(120, 0, 0, 80),
        paired_generative=paired(110, 0, 0, 90),
        agreement=agreement(np.zeros(n), np.ones(n, dtype=bool)),
        cost_vs_reference=cost(0.0),
    )


def test_none_like_is_rejected_only_for_memory() -> None:
    verdict = decide(none_like(), Thresholds())
    assert verdict.decision == "DON'T QUANTIZE"
    assert "saves no weight memory" in verdict.reasons[0]
    assert "memory" in verdict.summary
    quality = [r for r in verdict.reasons if "memory" not in r]
    assert quality and all(("ruled out" in r) or ("within" in r) or ("meets" in r) for r in quality)


def test_none_like_without_memory_requirement_is_not_rejected() -> None:
    verdict = decide(none_like(), Thresholds(min_memory_saving=0))
    assert verdict.decision != "DON'T QUANTIZE"
    assert verdict.decision == "QUANTIZE"


def test_clearly_good_variant() -> None:
    n = 2000
    good = variant(
        paired_loglik=paired(1180, 20, 20, 780),
        paired_generative=paired(1100, 25, 22, 853),
        agreement=agreement(small_kl(n, 0.01), top1(n, 1950)),
        cost_vs_reference=cost(0.62, latency={1: 1.4, 8: 0.95}, decode=0.8),
    )
    verdict = decide(good, Thresholds())
    assert verdict.decision == "QUANTIZE"
    assert "saves 62 % of weight memory" in verdict.reasons
    assert "forward pass 1.4x slower at batch 1" in verdict.reasons
    assert "generation (decode) 1.2x slower" in verdict.reasons
    assert not any("batch 8" in r for r in verdict.reasons)
    reasons = verdict.reasons
    assert any(r.startswith("mean KL 0.01") and "within the 0.05 limit" in r for r in reasons)
    assert any(r.startswith("log-likelihood accuracy +0.0 points (95 % CI") for r in reasons)
    assert verdict.summary.count(".") == 1 and verdict.summary.endswith(".")


def test_clearly_bad_variant() -> None:
    n = 200
    bad = variant(
        paired_loglik=paired(70, 50, 5, 75),
        agreement=agreement(small_kl(n, 0.4), top1(n, 140)),
        cost_vs_reference=cost(0.75),
    )
    verdict = decide(bad, Thresholds())
    assert verdict.decision == "DON'T QUANTIZE"
    assert any("worse by more than the 2.0-point limit" in r for r in verdict.reasons)
    assert any("above the 0.05 limit" in r for r in verdict.reasons)
    assert any("below the 90 % minimum" in r for r in verdict.reasons)
    assert "generated-answer accuracy against the reference was not measured" in verdict.reasons


@pytest.mark.parametrize("failing", ["accuracy", "kl", "top1"])
def test_each_quality_rule_alone_rejects(failing: str) -> None:
    n = 2000
    kl = small_kl(n, 0.4 if failing == "kl" else 0.005)
    agrees = top1(n, 1500 if failing == "top1" else 1980)
    loglik = paired(1000, 200, 20, 780) if failing == "accuracy" else paired(1180, 20, 20, 780)
    result = variant(
        paired_loglik=loglik, agreement=agreement(kl, agrees), cost_vs_reference=cost(0.5)
    )
    assert decide(result, Thresholds()).decision == "DON'T QUANTIZE"


def test_thin_evidence_is_inconclusive_with_advice() -> None:
    n = 166
    thin = variant(
        paired_loglik=paired(100, 12, 10, 44),
        agreement=agreement(small_kl(n, 0.01), top1(n, 163)),
        cost_vs_reference=cost(0.5),
    )
    verdict = decide(thin, Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    mde = round(thin.paired_loglik.min_detectable_difference * 100)
    advice = (
        f"166 questions can only detect differences of {mde} points or more: "
        "run with more questions (--dataset mmlu:all) to decide"
    )
    assert 7 <= mde <= 11
    assert advice in verdict.reasons
    assert advice in verdict.summary
    assert any("is not ruled out" in r for r in verdict.reasons)


def test_no_quality_evidence_is_inconclusive() -> None:
    verdict = decide(variant(cost_vs_reference=cost(0.6)), Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert "next-token agreement (KL, top-1) was not measured" in verdict.reasons
    assert "log-likelihood accuracy against the reference was not measured" in verdict.reasons
    assert "no quality evidence" in verdict.summary


def test_no_evidence_but_no_saving_is_still_rejected() -> None:
    assert decide(variant(cost_vs_reference=cost(0.05)), Thresholds()).decision == "DON'T QUANTIZE"


def test_unmeasured_memory_blocks_quantize() -> None:
    n = 2000
    result = variant(
        paired_loglik=paired(1180, 20, 20, 780),
        agreement=agreement(small_kl(n, 0.005), top1(n, 1980)),
    )
    verdict = decide(result, Thresholds())
    assert verdict.decision == "INCONCLUSIVE"
    assert "weight memory was not measured" in verdict.reasons
    assert "measure the cost" in verdict.summary


def test_larger_variant_says_it_uses_more_memory() -> None:
    verdict = decide(variant(cost_vs_reference=cost(-0.1)), Thresholds())
    assert verdict.decision == "DON'T QUANTIZE"
    assert verdict.reasons[0].startswith("uses 10 % more weight memory than the reference")
