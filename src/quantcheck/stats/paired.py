"""Paired comparison of a variant with the reference on the same questions.

Both models answer the same items, so their accuracies are correlated; treating them as two
independent samples would throw that away and widen every interval. Everything here works from
the paired 2x2 table: both right, only the reference right, only the variant right, both wrong.

- `mcnemar_exact_p`: does the variant flip answers one way more than the other? Exact (binomial)
  form, because the number of discordant items is often small.
- `paired_difference_interval`: how large the accuracy difference can plausibly be. Newcombe's
  hybrid score interval (Newcombe 1998, Statistics in Medicine 17:2635-2650, method 10).
- `min_detectable_difference`: how large a difference this many questions could have detected,
  so "p = 0.4" is never read as "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import optimize, stats

from quantcheck.schema.results import Interval, PairedComparison, SamplingComparison
from quantcheck.stats.intervals import wilson_interval

MIN_DISCORDANT_FRACTION = 0.02
"""Floor on the planning discordance. Two models that agreed on every one of a few hundred items
can still disagree on about 1 item in 50 of a larger set; without a floor, zero observed
disagreement would claim that any difference, however small, is detectable."""


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b against b + c at p = 0.5."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(right_to_wrong, discordant, 0.5).pvalue)


def _corrected_phi(both_right: int, variant_only: int, reference_only: int, both_wrong: int) -> float:
    """Newcombe's continuity-corrected correlation between the two models' correctness.

    Zero when any margin is empty (the correlation is undefined); a positive association
    ad - bc is reduced by n/2 and floored at zero, a negative one is kept as it is.
    """
    n = both_right + variant_only + reference_only + both_wrong
    margins = (
        both_right + variant_only,
        reference_only + both_wrong,
        both_right + reference_only,
        variant_only + both_wrong,
    )
    if 0 in margins:
        return 0.0
    association = both_right * both_wrong - variant_only * reference_only
    if association > n / 2:
        association -= n / 2
    elif association >= 0:
        association = 0
    return association / math.sqrt(math.prod(margins))


def paired_difference_interval(
    both_right: int,
    ref_only_right: int,
    variant_only_right: int,
    both_wrong: int,
    level: float = 0.95,
) -> Interval:
    """Interval for variant accuracy minus reference accuracy on the same items.

    Newcombe's method 10: the Wilson intervals of the two accuracies are combined around the
    observed difference, with the corrected phi accounting for their correlation. It stays in
    [-1, 1] and behaves with zero discordant pairs, where the Wald interval collapses to a point.
    """
    n = both_right + ref_only_right + variant_only_right + both_wrong
    if n <= 0:
        raise ValueError("a paired interval needs at least one item")
    p_variant = (both_right + variant_only_right) / n
    p_reference = (both_right + ref_only_right) / n
    ci_variant = wilson_interval(both_right + variant_only_right, n, level)
    ci_reference = wilson_interval(both_right + ref_only_right, n, level)
    phi = _corrected_phi(both_right, variant_only_right, ref_only_right, both_wrong)

    variant_down, variant_up = p_variant - ci_variant.low, ci_variant.high - p_variant
    reference_down, reference_up = p_reference - ci_reference.low, ci_reference.high - p_reference
    below = variant_down**2 - 2 * phi * variant_down * reference_up + reference_up**2
    above = reference_down**2 - 2 * phi * reference_down * variant_up + variant_up**2
    difference = p_variant - p_reference
    return Interval(
        low=max(-1.0, difference - math.sqrt(max(below, 0.0))),
        high=min(1.0, difference + math.sqrt(max(above, 0.0))),
        level=level,
        method="newcombe-paired",
    )


def _required_pairs(delta: float, discordant: float, z_alpha: float, z_power: float) -> float:
    """Connor (1987): pairs a two-sided McNemar test needs to detect `delta` at this power."""
    spread = math.sqrt(max(discordant - delta**2, 0.0))
    return (z_alpha * math.sqrt(discordant) + z_power * spread) ** 2 / delta**2


def min_detectable_difference(n: int, discordant_fraction: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |accuracy difference| a two-sided McNemar test on `n` pairs detects at `power`.

    Solves Connor's sample-size formula n = (z_{a/2} sqrt(p_d) + z_b sqrt(p_d - d^2))^2 / d^2
    for d. The discordant fraction p_d is floored at MIN_DISCORDANT_FRACTION. When n is too
    small for any difference (n <= z_{a/2}^2, under 4 pairs at alpha 0.05) the largest
    difference the formula admits, sqrt(p_d), is returned.
    """
    if n <= 0:
        raise ValueError("the detectable difference needs at least one pair")
    discordant = min(max(discordant_fraction, MIN_DISCORDANT_FRACTION), 1.0)
    z_alpha = stats.norm.ppf(1 - alpha / 2)
    z_power = stats.norm.ppf(power)
    largest = math.sqrt(discordant)
    if _required_pairs(largest, discordant, z_alpha, z_power) >= n:
        return largest
    return float(
        optimize.brentq(
            lambda delta: _required_pairs(delta, discordant, z_alpha, z_power) - n,
            1e-9,
            largest,
        )
    )


def compare_paired(
    reference_correct: Sequence[bool],
    variant_correct: Sequence[bool],
    reference_pred: Sequence[str | None],
    variant_pred: Sequence[str | None],
    fail_level: float | None = None,
) -> PairedComparison:
    """The variant against the reference on the same items, in the same order.

    An unparsable prediction (None) never agrees with anything, not even another None.
    `fail_level` adds the difference interval at the verdict's Bonferroni level.
    """
    n = len(reference_correct)
    if not n:
        raise ValueError("a paired comparison needs at least one item")
    if not len(variant_correct) == len(reference_pred) == len(variant_pred) == n:
        raise ValueError("reference and variant results must cover the same items")
    pairs = list(zip(reference_correct, variant_correct))
    both_right = sum(1 for ref, var in pairs if ref and var)
    ref_only = sum(1 for ref, var in pairs if ref and not var)
    variant_only = sum(1 for ref, var in pairs if var and not ref)
    both_wrong = n - both_right - ref_only - variant_only
    agreeing = sum(1 for ref, var in zip(reference_pred, variant_pred) if ref is not None and ref == var)
    reference_accuracy = (both_right + ref_only) / n
    variant_accuracy = (both_right + variant_only) / n
    table = (both_right, ref_only, variant_only, both_wrong)
    return PairedComparison(
        n=n,
        reference_accuracy=reference_accuracy,
        variant_accuracy=variant_accuracy,
        difference=variant_accuracy - reference_accuracy,
        difference_ci=paired_difference_interval(*table),
        difference_fail_ci=None if fail_level is None else paired_difference_interval(*table, level=fail_level),
        right_to_wrong=ref_only,
        wrong_to_right=variant_only,
        mcnemar_p=mcnemar_exact_p(ref_only, variant_only),
        answer_agreement=agreeing / n,
        min_detectable_difference=min_detectable_difference(n, (ref_only + variant_only) / n),
    )


def _differs(reference: str | None, other: str | None) -> bool:
    """An unparsable answer (None) never agrees, as in `compare_paired`."""
    return reference is None or reference != other


def _one_sided_excess(mine: Sequence[bool], theirs: Sequence[bool]) -> tuple[int, int, float]:
    """Items where only `mine` holds, where only `theirs` does, and the exact one-sided p that `mine` holds more
    often."""
    only_mine = sum(m and not t for m, t in zip(mine, theirs))
    only_theirs = sum(t and not m for m, t in zip(mine, theirs))
    discordant = only_mine + only_theirs
    p = float(stats.binomtest(only_mine, discordant, 0.5, alternative="greater").pvalue) if discordant else 1.0
    return only_mine, only_theirs, p


def compare_with_floor(
    reference: Sequence[tuple[str | None, bool]],
    variant: Sequence[tuple[str | None, bool]],
    floor: Sequence[tuple[str | None, bool]],
    alpha: float = 0.05,
) -> SamplingComparison:
    """Does the variant change the reference's generated answers more often than sampling the reference again does, or
    is it right less often than that resample? Each argument holds (answer, correct) per item, the same items in the
    same order.

    Paired on the items: only items where exactly one of the two differs from the reference carry
    information, and a one-sided exact binomial test asks whether the variant's side is larger. The
    verdict uses this only to keep a failing accuracy check from failing on sampling noise; the
    accuracy interval itself always stands, so the floor never makes a check pass.
    """
    n = len(reference)
    if not n or not len(variant) == len(floor) == n:
        raise ValueError("the floor comparison needs the same items for the reference, the variant and the floor")
    variant_differs = [_differs(ref, var) for (ref, _), (var, _) in zip(reference, variant)]
    floor_differs = [_differs(ref, again) for (ref, _), (again, _) in zip(reference, floor)]
    variant_only, floor_only, p = _one_sided_excess(variant_differs, floor_differs)
    # Is the variant right less often than the resample? An exact one-sided McNemar test on the items where one of the
    # two is right: breaking as many answers as the resample but fixing fewer is a real drop, not sampling.
    _, _, p_less_accurate = _one_sided_excess(
        [again and not var for (_, var), (_, again) in zip(variant, floor)],
        [var and not again for (_, var), (_, again) in zip(variant, floor)],
    )
    return SamplingComparison(
        n=n,
        variant_disagreements=sum(variant_differs),
        floor_disagreements=sum(floor_differs),
        variant_only=variant_only,
        floor_only=floor_only,
        p_above_floor=p,
        above_floor=p < alpha or p_less_accurate < alpha,
        variant_right_to_wrong=sum(right and not var for (_, right), (_, var) in zip(reference, variant)),
        floor_right_to_wrong=sum(right and not again for (_, right), (_, again) in zip(reference, floor)),
        p_less_accurate=p_less_accurate,
    )
