"""The verdict: quantize, don't quantize, or not enough evidence yet, with the reasons in words.

Rules, applied to one variant against the user's `Thresholds`:

- DON'T QUANTIZE when the variant saves less weight memory than `min_memory_saving` (a variant
  that saves nothing says so), or when a quality check shows it worse beyond a limit with its
  family-wise interval (`fail_ci`, below): the accuracy-difference interval lies wholly below
  -`max_accuracy_drop` (either scoring mode), the mean-KL interval wholly above `max_mean_kl`, or
  the top-1 agreement interval wholly below `min_top1_agreement`.
- QUANTIZE when the memory saving is met, every quality check that was measured passes with its
  whole 95 % interval (accuracy-difference low >= -`max_accuracy_drop` for each scoring mode,
  mean-KL high <= `max_mean_kl`, top-1 agreement low >= `min_top1_agreement`), and nothing that
  was asked for failed or stopped part-way.
- INCONCLUSIVE otherwise: an interval straddles a limit, the memory saving was not measured, no
  quality check was measured, or a phase that was asked for failed or is partial
  (`ModelResult.incomplete`). The reasons then say what would decide it.

Several checks, one error rate. Each of the m measured quality checks can say "fail", so at 95 %
each the chance of a false DON'T QUANTIZE would grow with m. A check fails only when its interval
at `fail_level(m)` = 1 - 0.05/m lies beyond the limit (Bonferroni): the m intervals then hold
together with at least 95 % confidence (`FAMILYWISE_LEVEL`) whatever their correlation (KL and
top-1 come from the same items). Bonferroni rather than Holm because it gives one level per
variant that is stored with every interval in results.json, and with m <= 4 Holm would gain
little. Passing needs no correction: QUANTIZE requires every check to pass (an intersection-union
test), so its error is at most that of a single 95 % check.

Mean KL from a compact reference store (the reference's top K tokens and a sample of its tail,
not every log-probability): the per-item KL is then an unbiased estimate whose sampling noise is
part of the spread the interval over items measures, so it passes as an exact KL would; it fails
only when the interval of the per-item *lower bounds* lies above the limit, which no content of
the unstored tail could undo.

Thin evidence is never a pass. A check on fewer than MIN_UNITS questions, windows or prompts is
unclear whatever its interval. Where the data set gives next-token checks (questions scored by
log-likelihood, texts, prompts), QUANTIZE needs them: a variant whose KL could not be computed is
unclear, not passed on accuracy alone.

The floors. Answers sampled at a temperature above 0 differ between two runs of the reference
itself (each model samples with its own seeds). A generated-answer check that would fail is unclear
when the variant neither changes answers more often than the reference sampled again nor is right
significantly less often than it: a floor can stop a failure, never make a check pass. Likewise a KL or
top-1 check is unclear where the engines' numeric floor (the reference or the variant scored twice by
its engine with two batch plans, the noisier) reaches NUMERIC_FLOOR_SHARE of the KL limit when it
passes, or of the variant's KL when it fails.

A phase that was asked for but failed or stopped part-way (a crash, out of memory, an interrupted
pass) is named in the reasons and its checks are not judged: a partial log-likelihood pass is a
biased subset, since the batch plan scores the longest questions first. A check that was not
asked for is named too and neither passes nor fails. Speed (forward-pass latency, decode
throughput) is reported but does not decide: whether a slowdown is acceptable depends on the
deployment, which the thresholds do not describe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quantcheck.analysis import format as fmt
from quantcheck.schema.results import (
    DRIFT_TOLERANCE,
    MIN_UNITS,
    CostComparison,
    Decision,
    DivergenceSummary,
    Estimate,
    Interval,
    ModelResult,
    NumericFloor,
    Outcome,
    PairedComparison,
    Phase,
    SamplingComparison,
    Thresholds,
    Verdict,
)

MORE_QUESTIONS_FLAG = "--dataset mmlu:all"
"""The option that runs the full benchmark, named in advice when the question set is too small."""
MORE_TEXT = "a longer text, or more of it with a higher --limit"
"""The same advice for a text corpus."""

RERUN_ADVICE = "fix what stopped it and run the same command again: finished work is kept and only the rest is measured"

FAMILYWISE_LEVEL = 0.95
"""The confidence with which all of a variant's 'fail' intervals hold together."""

SPEED_NOTE_RATIO = 1.1
"""Latency or throughput changes smaller than 10 % are not mentioned; larger ones are claimed only where their
whole interval clears the timing noise (`_noise_floor`), and otherwise said to be within it."""

PHASE_CHECKS: dict[Phase, tuple[str, ...]] = {
    "loglik": ("log-likelihood accuracy", "mean KL", "top-1 agreement"),
    "generation": ("generated-answer accuracy",),
    "corpus": ("mean KL", "top-1 agreement"),
}
"""The quality checks each scoring phase feeds; they are not judged when the phase is incomplete
(an incomplete cost phase makes the memory check unclear instead)."""


@dataclass(frozen=True)
class Check:
    """One quality or cost check: its outcome, what it found, and what would settle it."""

    name: str
    outcome: Outcome
    reason: str
    advice: str | None = None


def quality_check_count(loglik: bool, generative: bool, agreement: bool) -> int:
    """How many quality checks a variant's measurements give (agreement gives two: KL and top-1)."""
    return int(loglik) + int(generative) + 2 * int(agreement)


def _measured_checks(variant: ModelResult) -> int:
    return quality_check_count(
        variant.paired_loglik is not None, variant.paired_generative is not None, variant.agreement is not None
    )


def fail_level(checks: int) -> float:
    """The level of each 'fail' interval when `checks` quality checks are judged together."""
    return 1 - (1 - FAMILYWISE_LEVEL) / max(checks, 1)


def _memory_check(
    cost: CostComparison | None, thresholds: Thresholds, gap: str | None, unmeasured: Sequence[str] = ()
) -> Check:
    if cost is None:
        if gap:
            return Check("memory", "unclear", f"{gap}: the memory saving is not known", RERUN_ADVICE)
        if unmeasured:
            return Check(
                "memory",
                "unclear",
                f"weight memory was not measured for {' and '.join(unmeasured)}: "
                "a served model's memory is the server's, not visible to a client",
                "state it where you know it (e.g. from the server's log): url:URL?weight_gb=G",
            )
        return Check(
            "memory",
            "unclear",
            "weight memory was not measured",
            "measure the cost of both models to see whether the variant saves enough memory",
        )
    saving = cost.memory_saving
    if round(saving * 100) == 0:
        found = "saves no weight memory"
    elif saving < 0:
        found = f"uses {fmt.percent(-saving, 0)} more weight memory than the reference"
    else:
        found = f"saves {fmt.percent(saving, 0)} of weight memory"
    if cost.weight_memory_stated:
        found += " (a served model's weight memory as stated with weight_gb, not measured)"
    if saving < thresholds.min_memory_saving:
        required = fmt.percent(thresholds.min_memory_saving, 0)
        return Check("memory", "fail", f"{found}, less than the {required} saving required")
    return Check("memory", "pass", found)


def _factors(factors: list[float]) -> str:
    """A factor or a range of factors: "1.40×" or "1.10×-1.40×"."""
    low, high = fmt.ratio(min(factors)), fmt.ratio(max(factors))
    return high if low == high else f"{low}-{high}"


def _where(sizes: list[int], measured: list[int]) -> str:
    """ "batch size 1", "batch sizes 1-32" (every measured size) or "batch sizes 1, 2" (some of them)."""
    if len(sizes) == 1:
        return f"batch size {sizes[0]}"
    if sizes == sorted(measured):
        return f"batch sizes {sizes[0]}-{sizes[-1]}"
    return "batch sizes " + ", ".join(str(size) for size in sizes)


def _latency_note(
    ratios: dict[int, float], measured: list[int] | None = None, cis: dict[int, Interval] | None = None
) -> str:
    """Forward-pass latency (variant / reference) over the batch sizes claimed, on one line, with their intervals."""
    sizes = sorted(ratios)
    where = _where(sizes, measured if measured is not None else sizes)
    values = [ratios[size] for size in sizes]
    cis = {size: ci for size, ci in (cis or {}).items() if size in ratios}
    label = "95% CI" if len(sizes) == 1 else "95% CIs"
    within = len(cis) == len(sizes)
    if min(values) >= 1:
        suffix = (
            f" ({label} {fmt.ratio(min(c.low for c in cis.values()))}-{fmt.ratio(max(c.high for c in cis.values()))})"
            if within
            else ""
        )
        return f"forward pass {_factors(values)} slower at {where}{suffix}"
    if max(values) <= 1:
        suffix = (
            f" ({label} {fmt.ratio(1 / max(c.high for c in cis.values()))}"
            f"-{fmt.ratio(1 / min(c.low for c in cis.values()))})"
            if within
            else ""
        )
        return f"forward pass {_factors([1 / value for value in values])} faster at {where}{suffix}"
    suffix = " (each 95% CI beyond the timing noise)" if within else ""
    return (
        f"forward pass between {fmt.ratio(1 / min(values))} faster and {fmt.ratio(max(values))} slower "
        f"at {where}{suffix}"
    )


def _noise_floor(spread: float | None) -> float:
    """The timing noise a speed claim must clear: the models' own round-to-round spread, at least the drift
    tolerance."""
    return max(DRIFT_TOLERANCE, spread or 1.0)


def _side(value: float, ci: Interval | None, floor: float) -> int:
    """+1 where the whole interval (the value where there is none) is above `floor`, -1 where below 1 / `floor`,
    else 0."""
    low, high = (ci.low, ci.high) if ci is not None else (value, value)
    return 1 if low > floor else -1 if high < 1 / floor else 0


def _noise_reason(floor: float) -> str:
    return (
        f"not called faster or slower (a claim needs the whole 95% interval beyond {fmt.ratio(floor)}, "
        "what one model's cost rounds can move by)"
    )


def _speed_notes(cost: CostComparison | None) -> list[str]:
    """Forward-pass latency over the batch sizes where it clearly differs on one line, decode throughput on another.

    A claim needs the whole 95% interval on the ratio beyond 1 by more than the timing noise: both models' spread
    between undisturbed cost rounds, and at least the drift tolerance (what identical processes moved by between
    rounds). A ratio outside 10% that does not clear it gets a line saying it is within timing noise; where the
    timing was disturbed by other load (measured) or moved between cost rounds, a line says so instead of a claim."""
    if cost is None:
        return []
    notes = []
    stable = {size: ratio for size, ratio in cost.latency_ratio.items() if size not in cost.unstable_batch_sizes}
    floors = {size: _noise_floor(cost.latency_round_spread.get(size)) for size in stable}
    claimed = {
        size: ratio for size, ratio in stable.items() if _side(ratio, cost.latency_ratio_ci.get(size), floors[size])
    }
    if claimed:
        notes.append(_latency_note(claimed, sorted(stable), cost.latency_ratio_ci))
    noisy = sorted(
        size
        for size, ratio in stable.items()
        if size not in claimed and (ratio > SPEED_NOTE_RATIO or ratio < 1 / SPEED_NOTE_RATIO)
    )
    if noisy:
        values = []
        for size in noisy:
            ci = cost.latency_ratio_ci.get(size)
            values.append(
                f"{stable[size]:.2f} at batch {size}" + (f" (95% CI {ci.low:.2f}-{ci.high:.2f})" if ci else "")
            )
        where = f"batch size {noisy[0]}" if len(noisy) == 1 else "batch sizes " + ", ".join(str(size) for size in noisy)
        notes.append(
            f"forward pass within timing noise at {where}: variant / reference latency {', '.join(values)}; "
            + _noise_reason(max(floors[size] for size in noisy))
        )
    if cost.unstable_batch_sizes:
        sizes = ", ".join(str(size) for size in cost.unstable_batch_sizes)
        notes.append(
            f"forward-pass timing at batch size {sizes} was disturbed by other load on the machine "
            "(measured, or seen as a move between cost rounds): not called faster or slower there"
        )
    speedup, ci = cost.decode_speedup, cost.decode_speedup_ci
    if speedup is None:
        return notes
    floor = _noise_floor(cost.decode_round_spread)
    side = _side(speedup, ci, floor)
    if cost.decode_unstable:
        notes.append(
            "decode rate was disturbed by other load on the machine (measured, or seen as a move between cost rounds): "
            "not called faster or slower"
        )
    elif side < 0:
        notes.append(
            f"generation (decode) {fmt.ratio(1 / speedup)} slower"
            + (f" (95% CI {fmt.ratio(1 / ci.high)}-{fmt.ratio(1 / ci.low)})" if ci else "")
        )
    elif side > 0:
        notes.append(
            f"generation (decode) {fmt.ratio(speedup)} faster"
            + (f" (95% CI {fmt.ratio(ci.low)}-{fmt.ratio(ci.high)})" if ci else "")
        )
    elif speedup < 1 / SPEED_NOTE_RATIO or speedup > SPEED_NOTE_RATIO:
        interval = f" (95% CI {fmt.ratio(ci.low)}-{fmt.ratio(ci.high)})" if ci else ""
        notes.append(
            f"generation (decode) within timing noise: {fmt.ratio(speedup)} the reference's decode rate{interval}; "
            + _noise_reason(floor)
        )
    return notes


@dataclass(frozen=True)
class _Limit:
    """A threshold, which side of it is worse, and the words for each outcome."""

    value: float
    higher_is_worse: bool
    fail_words: str
    pass_words: str
    unclear_words: str

    @classmethod
    def ceiling(cls, value: float, text: str) -> _Limit:
        return cls(value, True, f"above {text}", f"within {text}", f"straddles {text}")

    @classmethod
    def floor(cls, value: float, text: str) -> _Limit:
        return cls(value, False, f"below {text}", f"meets {text}", f"straddles {text}")

    def beyond(self, ci: Interval) -> bool:
        return ci.low > self.value if self.higher_is_worse else ci.high < self.value

    def within(self, ci: Interval) -> bool:
        return ci.high <= self.value if self.higher_is_worse else ci.low >= self.value


def _fail_interval(ci: Interval | None, level: float, name: str) -> Interval:
    """The stored family-wise interval; it must have been computed for this variant's checks."""
    if ci is None or abs(ci.level - level) > 1e-9:
        found = "none" if ci is None else fmt.level(ci.level)
        raise ValueError(f"{name}: the verdict needs its interval at {fmt.level(level)}, found {found}")
    return ci


def _interval_check(
    name: str,
    head: str,
    tail: str,
    estimate: tuple[Interval | None, Interval | None],
    show: Callable[[Interval], str],
    limit: _Limit,
    level: float,
    advice: str,
    units: tuple[int | None, str] = (None, "items"),
    fail_label: str = "",
) -> Check:
    """Pass on the 95 % interval, fail on the family-wise one (`fail_label` names it when it is another estimate's),
    unclear otherwise, and unclear whatever the interval on fewer than MIN_UNITS independent units (`units`: their count
    and name)."""
    ci, stored_fail = estimate
    count, unit = units
    if count is not None and count < MIN_UNITS:
        return Check(
            name,
            "unclear",
            f"{head}{tail}: only {count} {unit.removesuffix('s') if count == 1 else unit}, fewer than the {MIN_UNITS} "
            "an interval needs to be "
            "trusted (its simulated coverage falls short below that), so it is not judged",
            advice,
        )
    if ci is None:
        return Check(name, "unclear", f"{head} without an interval (too few items){tail}", advice)
    fail = _fail_interval(stored_fail, level, name)
    found = f"{head} ({fmt.level(ci.level)} CI {show(ci)}){tail}"
    if limit.within(ci):
        return Check(name, "pass", f"{found}: {limit.pass_words}")
    if not limit.beyond(ci):
        return Check(name, "unclear", f"{found}: {limit.unclear_words}", advice)
    if fail.level != ci.level:
        found = (
            f"{head} ({fmt.level(ci.level)} CI {show(ci)}; {fail_label}{fmt.level(fail.level)} CI {show(fail)}){tail}"
        )
    if limit.beyond(fail):
        return Check(name, "fail", f"{found}: {limit.fail_words}")
    return Check(
        name,
        "unclear",
        f"{found}: {limit.fail_words} at {fmt.level(ci.level)} but not at the family-wise {fmt.level(fail.level)}",
        advice,
    )


def accuracy_check(
    label: str,
    paired: PairedComparison,
    thresholds: Thresholds,
    level: float,
    more_questions: str = MORE_QUESTIONS_FLAG,
) -> Check:
    """The accuracy-difference rule (also for two lm-eval runs); `more_questions` says how to get more questions."""
    drop = fmt.points(thresholds.max_accuracy_drop).lstrip("+")
    mde = fmt.points(paired.min_detectable_difference).lstrip("+")
    return _interval_check(
        f"{label} accuracy",
        f"{label} accuracy {fmt.points(paired.difference)}",
        f", McNemar p {fmt.pvalue(paired.mcnemar_p)}, {paired.right_to_wrong} right-to-wrong and "
        f"{paired.wrong_to_right} wrong-to-right of {paired.n} questions",
        (paired.difference_ci, paired.difference_fail_ci),
        lambda ci: fmt.interval(ci, "points"),
        _Limit(
            -thresholds.max_accuracy_drop,
            higher_is_worse=False,
            fail_words=f"worse by more than the {drop} limit",
            pass_words=f"a drop beyond the {drop} limit is ruled out",
            unclear_words=f"a drop beyond the {drop} limit is not ruled out",
        ),
        level,
        f"{paired.n} questions can only detect differences of {mde} or more: "
        f"run with more questions ({more_questions}) to decide",
        (paired.n, "questions"),
    )


def _sampling_floor(check: Check, floor: SamplingComparison | None) -> Check:
    """A failing generated-answer check whose changes sampling alone explains is unclear; nothing else changes.

    Not rejecting "no more than the reference's own resample" is no evidence of no harm, so the floor
    can only stop a failure (the difference is within the reference's own noise), never make a check
    pass: the paired accuracy interval always stands. It stops one only when the variant neither changes
    answers more often than the reference sampled again nor is right significantly less often than it.
    """
    if check.outcome != "fail" or floor is None or floor.above_floor:
        return check
    return Check(
        check.name,
        "unclear",
        (
            f"{check.reason}; but the variant changes the reference's answers no more often than the reference "
            f"sampled again changes them ({floor.variant_disagreements} against {floor.floor_disagreements} "
            f"of {floor.n}, one-sided p {fmt.pvalue(floor.p_above_floor)}) and is not shown right less often than it "
            f"(one-sided McNemar p {fmt.pvalue(floor.p_less_accurate)}): within sampling noise, not judged a failure"
        ),
        "run with more questions, or --greedy, to tell the variant from sampling noise",
    )


def noisier_floor(*floors: NumericFloor | None) -> NumericFloor | None:
    """Of the reference's and a variant's engine floors, the one with the larger mean KL: the noise under their
    comparison."""
    measured = [floor for floor in floors if floor is not None]
    return max(measured, key=lambda floor: floor.kl_mean) if measured else None


NUMERIC_FLOOR_SHARE = 0.25
"""A passing KL or top-1 check is unclear where the engines' own numeric noise (the reference or the variant scored
twice by its engine with two batch plans, the noisier) reaches this share of the KL limit: the instrument is too
coarse for the limit. A failing one is unclear where the noise reaches this share of the variant's own KL: it could
have made the difference. A variant far beyond what the noise explains still fails."""


def _numeric_floor(check: Check, floor: NumericFloor | None, variant_kl: float, max_kl: float) -> Check:
    """A KL or top-1 check the engine's own noise could have decided (`NUMERIC_FLOOR_SHARE`) is unclear."""
    if floor is None or check.outcome == "unclear":
        return check
    coarse = check.outcome == "pass" and floor.kl_mean >= NUMERIC_FLOOR_SHARE * max_kl
    if not (coarse or (check.outcome == "fail" and floor.kl_mean >= NUMERIC_FLOOR_SHARE * variant_kl)):
        return check
    against = (
        f"{fmt.percent(NUMERIC_FLOOR_SHARE, 0)} of the {fmt.nats(max_kl)} nats limit"
        if coarse
        else f"{fmt.percent(NUMERIC_FLOOR_SHARE, 0)} of the variant's own mean KL ({fmt.nats(variant_kl)} nats)"
    )
    return Check(
        check.name,
        "unclear",
        (
            f"{check.reason}; but the engine's own numeric noise ({floor.model or 'a model'} scored twice by its "
            f"engine, {floor.batch_size} at a time and one at a time: mean KL {fmt.nats(floor.kl_mean)} nats) is at "
            f"least {against}, so this difference cannot be told from it"
        ),
        "score on an engine with less numeric noise (fp32, or a fixed batch plan) to judge the next-token checks",
    )


def _estimate_check(
    name: str,
    estimate: Estimate,
    show: Callable[[float], str],
    kind: str,
    limit: _Limit,
    level: float,
    more: str = MORE_QUESTIONS_FLAG,
    unit: str = "questions",
) -> Check:
    """A check on one per-item mean or share (mean KL, top-1 agreement)."""
    return _interval_check(
        name,
        f"{name} {show(estimate.value)}",
        "",
        (estimate.ci, estimate.fail_ci),
        lambda ci: fmt.interval(ci, kind),
        limit,
        level,
        f"run with more data ({more}) to narrow the {name} interval",
        (estimate.units, unit),
    )


def _kl_check(
    kl: DivergenceSummary,
    thresholds: Thresholds,
    level: float,
    more: str = MORE_QUESTIONS_FLAG,
    unit: str = "questions",
) -> Check:
    """Mean KL. From a compact reference store the estimate passes and its lower bound fails: the
    estimate is unbiased (its sampling noise is inside the interval over items), while the lower
    bound can only understate the KL, so a 'fail' stays certain whatever the unstored tail held."""
    limit = _Limit.ceiling(thresholds.max_mean_kl, f"the {fmt.nats(thresholds.max_mean_kl)} nats limit")
    if kl.is_lower_bound:
        return _lower_bound_check(kl.mean, limit, level, unit)
    if kl.lower is None:
        return _estimate_check("mean KL", kl.mean, lambda v: f"{fmt.nats(v)} nats", "nats", limit, level, more, unit)
    return _interval_check(
        "mean KL",
        f"mean KL {fmt.nats(kl.mean.value)} nats",
        f", estimated from the compact reference store (lower bound {fmt.nats(kl.lower.value)} nats)",
        (kl.mean.ci, kl.lower.fail_ci),
        lambda ci: fmt.interval(ci, "nats"),
        limit,
        level,
        f"run with more data ({more}) to narrow the mean KL interval",
        (kl.mean.units, unit),
        fail_label="lower bound's ",
    )


def _lower_bound_check(estimate: Estimate, limit: _Limit, level: float, unit: str) -> Check:
    """Mean KL known only as a lower bound (a server's top-K rows): a bound beyond the limit fails,
    since the true KL is higher still; a bound within it proves nothing, so it never passes."""
    advice = "ask the server for every log-probability (vLLM: --max-logprobs -1) to judge mean KL"
    check = _interval_check(
        "mean KL",
        f"mean KL >= {fmt.nats(estimate.value)} nats (a lower bound)",
        "",
        (estimate.ci, estimate.fail_ci),
        lambda ci: fmt.interval(ci, "nats"),
        limit,
        level,
        advice,
        (estimate.units, unit),
    )
    if check.outcome != "pass":
        return check
    return Check(
        "mean KL", "unclear", f"{check.reason}, but a lower bound cannot show the true KL is within it", advice
    )


NEXT_TOKEN_CHECK = "next-token agreement"


def _quality_checks(
    variant: ModelResult, thresholds: Thresholds, level: float, unit: str, numeric_floor: NumericFloor | None
) -> tuple[list[Check], list[str]]:
    """The quality checks that can be judged, and a note for each that was not measured.

    Where the data set gives next-token checks (every question scored by log-likelihood, every text), they are
    required: a variant whose KL and top-1 could not be computed (another tokenizer) is unclear, never passed
    on accuracy alone."""
    checks: list[Check] = []
    missing: list[str] = []
    text = variant.corpus is not None or "corpus" in variant.incomplete  # a text corpus: no questions, no accuracy
    agreement_phase, more = ("corpus", MORE_TEXT) if text else ("loglik", MORE_QUESTIONS_FLAG)
    for label, paired, phase in (
        ("log-likelihood", variant.paired_loglik, "loglik"),
        ("generated-answer", variant.paired_generative, "generation"),
    ):
        if text or phase in variant.incomplete:
            continue
        if paired is None:
            missing.append(f"{label} accuracy against the reference was not measured")
        elif phase == "generation":
            checks.append(
                _sampling_floor(accuracy_check(label, paired, thresholds, level), variant.generative_vs_floor)
            )
        else:
            checks.append(accuracy_check(label, paired, thresholds, level))
    agreement = variant.agreement
    if agreement is not None and agreement_phase not in variant.incomplete:
        kl = _kl_check(agreement.kl, thresholds, level, more, unit)
        minimum = _Limit.floor(
            thresholds.min_top1_agreement, f"the {fmt.percent(thresholds.min_top1_agreement)} minimum"
        )
        top1 = _estimate_check(
            "top-1 agreement", agreement.top1_agreement, fmt.percent, "percent", minimum, level, more, unit
        )
        checks += [
            _numeric_floor(check, numeric_floor, agreement.kl.mean.value, thresholds.max_mean_kl)
            for check in (kl, top1)
        ]
    elif agreement is None and agreement_phase not in variant.incomplete:
        if text or variant.paired_loglik is not None:
            checks.append(
                Check(
                    NEXT_TOKEN_CHECK,
                    "unclear",
                    "next-token agreement (KL, top-1) could not be computed: the variant "
                    "does not see the reference's token ids (another tokenizer), so accuracy alone cannot pass it",
                    "compare a variant that shares the reference's tokenizer, or judge it on accuracy by hand",
                )
            )
        else:
            missing.append("next-token agreement (KL, top-1) was not measured")
    return checks, missing


def quality_checks(
    variant: ModelResult, thresholds: Thresholds, *, unit: str = "questions", numeric_floor: NumericFloor | None = None
) -> list[Check]:
    """The quality checks alone, at the levels `decide` judges them: what a run can say before its cost phase."""
    return _quality_checks(variant, thresholds, fail_level(_measured_checks(variant)), unit, numeric_floor)[0]


def _growth_note(variant: ModelResult) -> list[str]:
    """Damage that grows along the context, named where its interval is above zero; it informs and does not decide
    (a short text's windows say little of long contexts, and the mean KL check already weighs every position)."""
    growth = variant.corpus.kl_growth if variant.corpus else None
    if growth is None or growth.ci is None or growth.ci.low <= 0:
        return []
    shares = len(variant.corpus.by_position)
    return [
        f"mean KL grows along the context: the last 1/{shares} of each sequence's scored tokens is "
        f"{fmt.nats_ci(growth.value, growth.ci)} nats above the first (paired over {growth.units} sequences); "
        "this informs and does not decide"
    ]


def _free_answers_note(variant: ModelResult) -> list[str]:
    """A prompts run: how often the variant's own greedy answer is the reference's, and where the others part; it
    informs and does not decide (an answer that parts at token 20 can be as good as the reference's)."""
    answers = variant.free_answers
    if answers is None:
        return []
    note = f"its own greedy answers equal the reference's on {answers.n - answers.diverged} of {answers.n} prompts"
    if answers.diverged:
        note += f"; the others part at answer token {answers.first_divergence['median']:g} (median)"
    if answers.no_stop > answers.reference_no_stop:
        note += f"; {answers.no_stop} never stop within {answers.max_new_tokens} tokens"
    return [note + "; this informs and does not decide"]


def _incomplete_reasons(variant: ModelResult) -> list[str]:
    """One reason per phase that was asked for but failed or stopped part-way."""
    return [
        f"{gap}: not judged ({', '.join(PHASE_CHECKS[phase])})" if phase in PHASE_CHECKS else gap
        for phase, gap in variant.incomplete.items()
        if phase != "cost"  # the memory check says it
    ]


def _familywise_note(measured: int, level: float) -> str:
    if measured == 1:
        return f"the one quality check measured fails only when its {fmt.level(level)} interval lies beyond the limit"
    return (
        f"a quality check fails only when its {fmt.level(level)} interval lies beyond the limit: "
        f"Bonferroni over {measured} quality checks keeps the family-wise level at {fmt.level(FAMILYWISE_LEVEL)}"
    )


def _summary(name: str, decision: Decision, memory: Check, checks: list[Check], advice: list[str]) -> str:
    if decision == "QUANTIZE":
        return f"Quantize to {name}: it {memory.reason} and every measured quality check stays within its limits."
    if decision == "DON'T QUANTIZE":
        if memory.outcome == "fail":
            return f"Don't quantize to {name}: it {memory.reason}."
        first_failure = next(c for c in checks if c.outcome == "fail")
        return f"Don't quantize to {name}: {first_failure.reason} (family-wise {fmt.level(FAMILYWISE_LEVEL)})."
    if not checks and not advice:
        return f"No verdict on {name}: no quality evidence was measured."
    return f"No verdict on {name} yet; {advice[0]}."


def decide(
    variant: ModelResult,
    thresholds: Thresholds,
    unmeasured_memory: Sequence[str] = (),
    *,
    unit: str = "questions",
    numeric_floor: NumericFloor | None = None,
    unverified_tokenizers: Sequence[str] = (),
) -> Verdict:
    """Apply the module's rules to one variant's measurements against the reference.

    `unmeasured_memory` names the models (reference or variant) whose weight memory cannot be
    measured (served ones): the memory check is then unclear, saying why. `unit` names what the
    intervals resample (questions, windows, prompts); `numeric_floor` is the engine's own noise;
    `unverified_tokenizers` names the served models whose tokenizer could not be checked against the
    local one: every comparison then may rest on other token ids, so it cannot pass.
    """
    measured = _measured_checks(variant)
    level = fail_level(measured)
    memory = _memory_check(variant.cost_vs_reference, thresholds, variant.incomplete.get("cost"), unmeasured_memory)
    checks, missing = _quality_checks(variant, thresholds, level, unit, numeric_floor)
    if unverified_tokenizers:
        checks.append(
            Check(
                "tokenizer",
                "unclear",
                f"the server's tokenizer of {' and '.join(unverified_tokenizers)} was not shown "
                "to match the local one (it differs, or the server answers neither /tokenize nor an echoed prompt): "
                "the comparisons may rest on other token ids",
                "serve it with /tokenize or echo enabled (vLLM and "
                "llama-server have both) and the model's own tokenizer",
            )
        )
    outcomes = {memory.outcome, *(c.outcome for c in checks)}
    if "fail" in outcomes:
        decision: Decision = "DON'T QUANTIZE"
    elif checks and outcomes == {"pass"} and not variant.incomplete:
        decision = "QUANTIZE"
    else:
        decision = "INCONCLUSIVE"

    reasons = [memory.reason, *_speed_notes(variant.cost_vs_reference)]
    reasons += _incomplete_reasons(variant) + [c.reason for c in checks] + missing + _growth_note(variant)
    reasons += _free_answers_note(variant)
    if checks:
        reasons.append(_familywise_note(measured, level))
    elif not variant.incomplete:
        reasons.append("no quality evidence was measured, so quality cannot be judged")
    advice = [RERUN_ADVICE] if variant.incomplete else []
    advice += [c.advice for c in [*checks, memory] if c.advice]
    advice = list(dict.fromkeys(advice))
    if decision == "INCONCLUSIVE":
        reasons += advice
    return Verdict(
        decision=decision,
        reasons=reasons,
        summary=_summary(variant.name, decision, memory, checks, advice),
        familywise_level=FAMILYWISE_LEVEL,
        fail_level=level if measured else None,
        checks={check.name: check.outcome for check in [memory, *checks]},
        advice=advice,
    )
