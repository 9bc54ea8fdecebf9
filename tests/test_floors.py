"""The reference's own noise: the sampling floor decides whether generated-answer changes are the variant's doing."""

from __future__ import annotations

from quantcheck.stats.paired import compare_with_floor
from quantcheck.verdict import decide
from quantcheck.results.schema import Thresholds
from test_verdict import clearly_good


def answers(n: int, differing: set[int], base: str = "A", other: str = "B") -> list[str]:
    return [other if index in differing else base for index in range(n)]


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
    comparison = compare_with_floor(["A", None, "C"], ["A", None, "C"], ["A", "B", "C"])
    assert comparison.variant_disagreements == 1 and comparison.floor_disagreements == 1


def test_generated_answer_check_passes_within_the_floor_and_is_judged_above_it():
    n = 2000
    # Generated accuracy 5 points lower: on its own this rejects the variant.
    worse = clearly_good(generative=(1000, 125, 25, 850))
    assert decide(worse, Thresholds()).decision == "DON'T QUANTIZE"
    reference = answers(n, set())
    variant = answers(n, set(range(150)))
    within = compare_with_floor(reference, variant, answers(n, set(range(10, 170))))
    above = compare_with_floor(reference, variant, answers(n, set(range(10))))
    assert not within.above_floor and above.above_floor
    judged = decide(worse.model_copy(update={"generative_vs_floor": within}), Thresholds())
    assert judged.decision == "QUANTIZE" and judged.checks["generated-answer accuracy"] == "pass"
    assert any("within the sampling floor" in reason for reason in judged.reasons)
    assert decide(worse.model_copy(update={"generative_vs_floor": above}), Thresholds()).decision == "DON'T QUANTIZE"
