"""The reference's own noise: the sampling floor decides whether generated-answer changes are the variant's doing."""

from __future__ import annotations

from quantcheck.analysis.verdict import decide
from quantcheck.schema.results import Thresholds
from quantcheck.stats.paired import compare_with_floor
from test_verdict import clearly_good


def answers(n: int, differing: set[int], base: str = "A", other: str = "B") -> list[tuple[str, bool]]:
    """(answer, correct) per item: the base answer is right, the other one wrong."""
    return [(other, False) if index in differing else (base, True) for index in range(n)]


def test_a_variant_that_differs_as_often_as_sampling_is_within_the_floor():
    n = 166
    reference = answers(n, set())
    variant = answers(n, {1, 5, 9, 20, 33, 47, 80, 120})  # the demo: 8 of 166 generated answers differed
    floor = answers(n, {2, 5, 11, 20, 40, 47, 90, 150})  # the reference against itself, another seed
    comparison = compare_with_floor(reference, variant, floor)
    assert (comparison.variant_disagreements, comparison.floor_disagreements) == (8, 8)
    assert (comparison.variant_only, comparison.floor_only) == (5, 5)
    assert comparison.p_above_floor > 0.5 and not comparison.above_floor


def test_a_variant_far_above_the_floor_is_flagged_with_the_exact_one_sided_p():
    n = 166
    comparison = compare_with_floor(answers(n, set()), answers(n, set(range(20))), answers(n, {30, 31}))
    assert (comparison.variant_only, comparison.floor_only) == (20, 2)
    # P(X >= 20) for X ~ Binomial(22, 1/2) = (C(22,20) + C(22,21) + C(22,22)) / 2^22
    assert abs(comparison.p_above_floor - (231 + 22 + 1) / 2**22) < 1e-15
    assert comparison.above_floor


def test_unparsable_answers_count_as_differing():
    comparison = compare_with_floor(
        [("A", True), (None, False), ("C", False)],
        [("A", True), (None, False), ("C", False)],
        [("A", True), ("B", False), ("C", False)],
    )
    assert comparison.variant_disagreements == 1 and comparison.floor_disagreements == 1


def test_the_floor_never_makes_a_failing_check_pass():
    """Defect 1 of #24: within the floor, a failing generated-answer check was turned into 'pass'. Failing to show
    the variant above the floor is no evidence of no harm: the floor may stop a failure (unclear), never pass it."""
    n = 2000
    worse = clearly_good(generative=(1000, 125, 25, 850))  # 5 points lower: on its own this rejects the variant
    assert decide(worse, Thresholds()).decision == "DON'T QUANTIZE"
    reference = answers(n, set())
    variant = answers(n, set(range(150)))
    within = compare_with_floor(reference, variant, answers(n, set(range(10, 170))))
    above = compare_with_floor(reference, variant, answers(n, set(range(10))))
    assert not within.above_floor and above.above_floor
    judged = decide(worse.model_copy(update={"generative_vs_floor": within}), Thresholds())
    assert judged.decision == "INCONCLUSIVE" and judged.checks["generated-answer accuracy"] == "unclear"
    assert any("within sampling noise, not judged a failure" in reason for reason in judged.reasons)
    assert decide(worse.model_copy(update={"generative_vs_floor": above}), Thresholds()).decision == "DON'T QUANTIZE"


def _table(
    n: int,
    right_to_wrong: set[int],
    wrong_to_right: set[int],
    wrong: set[int],
    wrong_to_wrong: frozenset[int] = frozenset(),
) -> list[tuple[str, bool]]:
    """Answers against a reference that is right except on `wrong`: flips either way change the answer, as does
    another wrong answer on `wrong_to_wrong`."""
    out = []
    for index in range(n):
        right = (index not in wrong) != (index in right_to_wrong or index in wrong_to_right)
        changed = index in right_to_wrong or index in wrong_to_right or index in wrong_to_wrong
        out.append(("B" if changed else "A", right))
    return out


def test_the_issue_example_a_clear_drop_is_not_excused_by_the_floor():
    """1,000 items; the reference resampled changes 200 answers, balanced; the variant 220, 130 of them right to wrong:
    a paired drop of 8 points [-10.6, -5.4]. Before the fix the check passed; now the floor sees the direction too."""
    n = 1000
    wrong = set(range(500, 1000))  # the reference is right on half the items
    reference = [("A", index not in wrong) for index in range(n)]
    variant = _table(n, set(range(130)), set(range(500, 550)), wrong, frozenset(range(550, 590)))
    floor = _table(n, set(range(200, 300)), set(range(700, 800)), wrong)
    comparison = compare_with_floor(reference, variant, floor)
    assert (comparison.variant_disagreements, comparison.floor_disagreements) == (220, 200)
    assert comparison.variant_right_to_wrong == 130 and comparison.floor_right_to_wrong == 100
    assert comparison.p_above_floor > 0.05  # changed answers alone: not above the floor
    assert comparison.p_less_accurate < 0.05 and comparison.above_floor  # right less often than the resample: above it
    table = (500 - 130, 130, 50, 500 - 50)
    verdict = decide(
        clearly_good(generative=table).model_copy(update={"generative_vs_floor": comparison}), Thresholds()
    )
    assert verdict.checks["generated-answer accuracy"] == "fail" and verdict.decision == "DON'T QUANTIZE"


def test_small_sample_within_the_floor_is_not_quantize():
    """40 items, the variant differs on 6 (all right to wrong), the floor on 2: was QUANTIZE through the floor."""
    n = 40
    reference = answers(n, set())
    comparison = compare_with_floor(reference, answers(n, set(range(6))), answers(n, {20, 21}))
    verdict = decide(
        clearly_good(generative=(34, 6, 0, 0)).model_copy(update={"generative_vs_floor": comparison}), Thresholds()
    )
    assert verdict.decision != "QUANTIZE" and verdict.checks["generated-answer accuracy"] != "pass"


def test_each_model_samples_with_its_own_seed_per_item():
    """The reference, its resample and each variant draw independent seeds (one per model and item), stable on
    resume."""
    from quantcheck.scoring.generative import sample_seed

    seeds = {
        (model, item): sample_seed(0, model, item)
        for model in ("reference", "reference (resampled)", "bnb-nf4")
        for item in ("q1", "q2")
    }
    assert len(set(seeds.values())) == len(seeds)
    assert (
        sample_seed(0, "bnb-nf4", "q1") == seeds[("bnb-nf4", "q1")]
        and sample_seed(1, "bnb-nf4", "q1") != seeds[("bnb-nf4", "q1")]
    )
    assert all(0 <= seed < 2**31 for seed in seeds.values())


def test_a_resample_that_breaks_and_fixes_alike_does_not_mask_a_net_drop():
    """Found in review: the resample breaks 100 right answers and fixes 100, the variant breaks 110 and fixes 20 (-9
    points). Counting only right-to-wrong changes (110 against 100) missed it; the variant's accuracy against the
    resample's (an exact one-sided McNemar test) does not."""
    n = 1000
    wrong = set(range(600, 1000))
    reference = [("A", index not in wrong) for index in range(n)]
    variant = _table(n, set(range(110)), set(range(600, 620)), wrong)
    floor = _table(n, set(range(200, 300)), set(range(700, 800)), wrong)
    comparison = compare_with_floor(reference, variant, floor)
    assert comparison.p_above_floor > 0.05 and comparison.p_less_accurate < 1e-4 and comparison.above_floor
    verdict = decide(
        clearly_good(generative=(600 - 110, 110, 20, 400 - 20)).model_copy(update={"generative_vs_floor": comparison}),
        Thresholds(),
    )
    assert verdict.decision == "DON'T QUANTIZE"
