"""The verdict: quantize, don't quantize, or not enough evidence yet, with the reasons in words.

Rules, applied to one variant against the user's `Thresholds`:

- DON'T QUANTIZE when the variant saves less weight memory than `min_memory_saving` (a variant
  that saves nothing says so), or when the evidence shows it is worse beyond a limit:
  the whole accuracy-difference interval lies below -`max_accuracy_drop` (either scoring mode),
  the lower bound of the mean-KL interval is above `max_mean_kl`, or the upper bound of the
  top-1 agreement interval is below `min_top1_agreement`.
- QUANTIZE when the memory saving is met and every quality check that was measured passes with
  its whole interval: accuracy-difference low >= -`max_accuracy_drop` for each scoring mode
  measured, mean-KL high <= `max_mean_kl`, top-1 agreement low >= `min_top1_agreement`.
- INCONCLUSIVE otherwise: an interval straddles a limit, the memory saving was not measured, or
  no quality check was measured at all. The reasons then say what would decide it.

A check that was not measured is named in the reasons and neither passes nor fails. Speed
(forward-pass latency, decode throughput) is reported but does not decide: whether a slowdown
is acceptable depends on the deployment, which the thresholds do not describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from quantcheck.results.schema import (
    CostComparison,
    Decision,
    Estimate,
    ModelResult,
    PairedComparison,
    Thresholds,
    Verdict,
)

MORE_QUESTIONS_FLAG = "--dataset mmlu:all"
"""The option that runs the full benchmark, named in advice when the question set is too small."""

SPEED_NOTE_RATIO = 1.1
"""Latency or throughput changes smaller than 10 % are within timing noise and not mentioned."""

Outcome = Literal["pass", "fail", "unclear"]


@dataclass(frozen=True)
class Check:
    """One quality or cost check: its outcome, what it found, and what would settle it."""

    outcome: Outcome
    reason: str
    advice: str | None = None


def _minus(text: str) -> str:
    """Typographic minus sign for numbers shown to people."""
    return text.replace("-", "\u2212")


def _points(fraction: float) -> str:
    return _minus(f"{fraction * 100:+.1f}")


def _p_value(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f} %"


def _level(level: float) -> str:
    return f"{level * 100:.0f} % CI"


def _memory_check(cost: CostComparison | None, thresholds: Thresholds) -> Check:
    if cost is None:
        return Check(
            "unclear",
            "weight memory was not measured",
            "measure the cost of both models to see whether the variant saves enough memory",
        )
    saving = cost.memory_saving
    if round(saving * 100) == 0:
        found = "saves no weight memory"
    elif saving < 0:
        found = f"uses {_percent(-saving)} more weight memory than the reference"
    else:
        found = f"saves {_percent(saving)} of weight memory"
    if saving < thresholds.min_memory_saving:
        required = _percent(thresholds.min_memory_saving)
        return Check("fail", f"{found}, less than the {required} saving required")
    return Check("pass", found)


def _speed_notes(cost: CostComparison | None) -> list[str]:
    if cost is None:
        return []
    notes = []
    for batch_size, ratio in sorted(cost.latency_ratio.items()):
        if ratio > SPEED_NOTE_RATIO:
            notes.append(f"forward pass {ratio:.1f}x slower at batch {batch_size}")
        elif ratio < 1 / SPEED_NOTE_RATIO:
            notes.append(f"forward pass {1 / ratio:.1f}x faster at batch {batch_size}")
    speedup = cost.decode_speedup
    if speedup is not None and speedup < 1 / SPEED_NOTE_RATIO:
        notes.append(f"generation (decode) {1 / speedup:.1f}x slower")
    elif speedup is not None and speedup > SPEED_NOTE_RATIO:
        notes.append(f"generation (decode) {speedup:.1f}x faster")
    return notes


def accuracy_check(
    label: str, paired: PairedComparison, thresholds: Thresholds, more_questions: str = MORE_QUESTIONS_FLAG
) -> Check:
    """The accuracy-difference rule; `more_questions` names how to get more questions when unclear."""
    ci = paired.difference_ci
    limit = thresholds.max_accuracy_drop
    found = (
        f"{label} accuracy {_points(paired.difference)} points "
        f"({_level(ci.level)} {_points(ci.low)} to {_points(ci.high)}), "
        f"McNemar {_p_value(paired.mcnemar_p)}, "
        f"{paired.right_to_wrong} right-to-wrong and {paired.wrong_to_right} wrong-to-right "
        f"of {paired.n} questions"
    )
    limit_text = f"the {limit * 100:.1f}-point limit"
    if ci.high < -limit:
        return Check("fail", f"{found}: worse by more than {limit_text}")
    if ci.low >= -limit:
        return Check("pass", f"{found}: a drop beyond {limit_text} is ruled out")
    mde = paired.min_detectable_difference * 100
    return Check(
        "unclear",
        f"{found}: a drop beyond {limit_text} is not ruled out",
        f"{paired.n} questions can only detect differences of {mde:.0f} points or more: "
        f"run with more questions ({more_questions}) to decide",
    )


def _kl_check(kl: Estimate, thresholds: Thresholds) -> Check:
    limit = thresholds.max_mean_kl
    if kl.ci is None:
        return Check(
            "unclear",
            f"mean KL {kl.value:.3g} without an interval (too few items)",
            f"run with more questions ({MORE_QUESTIONS_FLAG}) to bound the KL",
        )
    found = f"mean KL {kl.value:.3g} ({_level(kl.ci.level)} {kl.ci.low:.3g} to {kl.ci.high:.3g})"
    if kl.ci.low > limit:
        return Check("fail", f"{found} above the {limit:g} limit")
    if kl.ci.high <= limit:
        return Check("pass", f"{found} within the {limit:g} limit")
    return Check(
        "unclear",
        f"{found} straddles the {limit:g} limit",
        f"run with more questions ({MORE_QUESTIONS_FLAG}) to narrow the KL interval",
    )


def _top1_check(top1: Estimate, thresholds: Thresholds) -> Check:
    limit = _percent(thresholds.min_top1_agreement)
    if top1.ci is None:
        return Check(
            "unclear",
            f"top-1 agreement {_percent(top1.value)} without an interval (too few items)",
            f"run with more questions ({MORE_QUESTIONS_FLAG}) to bound the top-1 agreement",
        )
    found = (
        f"top-1 agreement {top1.value * 100:.1f} % "
        f"({_level(top1.ci.level)} {top1.ci.low * 100:.1f} to {top1.ci.high * 100:.1f} %)"
    )
    if top1.ci.high < thresholds.min_top1_agreement:
        return Check("fail", f"{found} below the {limit} minimum")
    if top1.ci.low >= thresholds.min_top1_agreement:
        return Check("pass", f"{found} meets the {limit} minimum")
    return Check(
        "unclear",
        f"{found} straddles the {limit} minimum",
        f"run with more questions ({MORE_QUESTIONS_FLAG}) to narrow the agreement interval",
    )


def _quality_checks(variant: ModelResult, thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """The measured quality checks, and a note for each part that was not measured."""
    checks: list[Check] = []
    missing: list[str] = []
    for label, paired in (
        ("log-likelihood", variant.paired_loglik),
        ("generated-answer", variant.paired_generative),
    ):
        if paired is None:
            missing.append(f"{label} accuracy against the reference was not measured")
        else:
            checks.append(accuracy_check(label, paired, thresholds))
    agreement = variant.agreement
    if agreement is None:
        missing.append("next-token agreement (KL, top-1) was not measured")
    else:
        checks.append(_kl_check(agreement.kl.mean, thresholds))
        checks.append(_top1_check(agreement.top1_agreement, thresholds))
    return checks, missing


def _summary(name: str, decision: Decision, memory: Check, checks: list[Check]) -> str:
    if decision == "QUANTIZE":
        return (
            f"Quantize to {name}: it {memory.reason} and every measured quality check "
            "stays within its limits."
        )
    if decision == "DON'T QUANTIZE":
        if memory.outcome == "fail":
            return f"Don't quantize to {name}: it {memory.reason}."
        first_failure = next(c for c in checks if c.outcome == "fail")
        return f"Don't quantize to {name}: {first_failure.reason}."
    if not checks:
        return f"No verdict on {name}: no quality evidence was measured."
    advice = next((c.advice for c in [*checks, memory] if c.advice), None)
    return f"No verdict on {name} yet; {advice}."


def decide(variant: ModelResult, thresholds: Thresholds) -> Verdict:
    """Apply the module's rules to one variant's measurements against the reference."""
    memory = _memory_check(variant.cost_vs_reference, thresholds)
    checks, missing = _quality_checks(variant, thresholds)
    outcomes = {memory.outcome, *(c.outcome for c in checks)}
    if "fail" in outcomes:
        decision: Decision = "DON'T QUANTIZE"
    elif checks and outcomes == {"pass"}:
        decision = "QUANTIZE"
    else:
        decision = "INCONCLUSIVE"

    reasons = [memory.reason, *_speed_notes(variant.cost_vs_reference)]
    reasons += [c.reason for c in checks] + missing
    if not checks:
        reasons.append("no quality evidence was measured, so quality cannot be judged")
    if decision == "INCONCLUSIVE":
        reasons += list(dict.fromkeys(c.advice for c in [*checks, memory] if c.advice))
    return Verdict(
        decision=decision,
        reasons=reasons,
        summary=_summary(variant.name, decision, memory, checks),
    )
