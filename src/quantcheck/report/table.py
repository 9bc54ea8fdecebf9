"""The report's tables as rows of formatted strings, shared by HTML and Markdown, and metrics.csv.

HTML and Markdown build their tables from the same functions here, so a number reads identically
in both. `metrics.csv` holds the raw (unformatted) numbers, one row per model.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from quantcheck.analysis import format as fmt
from quantcheck.analysis.corpus import DELTA_P_PERCENTILES, KL_PERCENTILES
from quantcheck.analysis.recommend import recommend
from quantcheck.metrics.item_metrics import ITEM_METRICS, ItemMetric
from quantcheck.report.data import is_text_run, reference_model, variant_models
from quantcheck.schema.results import (
    DRIFT_TOLERANCE,
    TOP_K,
    Estimate,
    Interval,
    LatencyPoint,
    ModelResult,
    Recommendation,
    Results,
    undisturbed_rounds,
)
from quantcheck.schema.sensitivity import SensitivityTable
from quantcheck.tasks import task_named

# ---------------------------------------------------------------------------------------- verdicts

VERDICT_COLUMNS = [
    "Variant",
    "Decision",
    "Weight memory vs ref",
    "\u0394 accuracy (loglik) [95% CI]",
    "McNemar p",
    "Mean KL (nats)",
    "Top-1 agreement",
    "Jaccard@1 / @20",
]
QUESTION_ONLY_COLUMNS = ("\u0394 accuracy (loglik) [95% CI]", "McNemar p")
"""Verdict columns a text run leaves out: it has no questions, so no accuracy."""


def verdict_columns(results: Results) -> list[str]:
    return [c for c in VERDICT_COLUMNS if not (is_text_run(results) and c in QUESTION_ONLY_COLUMNS)]


@dataclass
class VerdictRow:
    name: str
    quant: str
    description: str
    status: str
    decision: str
    decision_class: str
    memory: str
    delta_accuracy: str
    mcnemar_p: str
    mean_kl: str
    top1: str
    jaccard: str
    summary: str
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def cells(self, text_run: bool = False) -> list[str]:
        """The row under `VERDICT_COLUMNS`, or under `verdict_columns` of a text run when `text_run`."""
        cells = [
            self.name,
            self.decision,
            self.memory,
            self.delta_accuracy,
            self.mcnemar_p,
            self.mean_kl,
            self.top1,
            self.jaccard,
        ]
        return [
            cell for cell, column in zip(cells, VERDICT_COLUMNS) if not (text_run and column in QUESTION_ONLY_COLUMNS)
        ]


def decision_text(m: ModelResult) -> tuple[str, str]:
    """The decision shown for a model and a CSS class for it."""
    if m.verdict is not None:
        cls = {"QUANTIZE": "quantize", "DON'T QUANTIZE": "dont", "INCONCLUSIVE": "inconclusive"}
        return m.verdict.decision, cls[m.verdict.decision]
    if m.status == "failed":
        return "FAILED (no verdict)", "failed"
    return f"no verdict ({m.status})", "none"


def jaccard_value(m: ModelResult, k: int) -> float | None:
    if m.agreement is None:
        return None
    est = m.agreement.jaccard.get(k)
    return est.value if est is not None else None


def _bound_mark(agreement, text: str) -> str:
    """KL figures that are lower bounds (a server's top-K rows) read as such wherever they are shown."""
    return f"≥ {text} (lower bound)" if agreement.kl.is_lower_bound else text


def verdict_row(m: ModelResult) -> VerdictRow:
    decision, cls = decision_text(m)
    cvr = m.cost_vs_reference
    pl = m.paired_loglik
    ag = m.agreement
    return VerdictRow(
        name=m.name,
        quant=m.quant or "",
        description=m.description,
        status=m.status,
        decision=decision,
        decision_class=cls,
        memory=fmt.memory_vs_ref(cvr.weight_memory_ratio if cvr else None, cvr.memory_saving if cvr else None),
        delta_accuracy=fmt.points_ci(pl.difference, pl.difference_ci) if pl else fmt.NA,
        mcnemar_p=fmt.pvalue(pl.mcnemar_p) if pl else fmt.NA,
        mean_kl=_bound_mark(ag, fmt.nats(ag.kl.mean.value)) if ag else fmt.NA,
        top1=fmt.percent(ag.top1_agreement.value) if ag else fmt.NA,
        jaccard=f"{fmt.fraction(jaccard_value(m, 1))} / {fmt.fraction(jaccard_value(m, 20))}",
        summary=m.verdict.summary if m.verdict else "",
        reasons=list(m.verdict.reasons) if m.verdict else [],
        errors=list(m.errors),
    )


def verdict_rows(results: Results) -> list[VerdictRow]:
    return [verdict_row(m) for m in variant_models(results)]


def thresholds_text(results: Results) -> str:
    """The limits the verdicts judged: a text run has no accuracy to judge."""
    t = results.thresholds
    accuracy = "" if is_text_run(results) else f"accuracy drop \u2264 {t.max_accuracy_drop * 100:.1f} pts, "
    return (
        f"{accuracy}mean KL \u2264 {fmt.nats(t.max_mean_kl)} nats, "
        f"top-1 agreement \u2265 {fmt.percent(t.min_top1_agreement)}, "
        f"weight memory saving \u2265 {fmt.percent(t.min_memory_saving)}"
    )


def familywise_text(results: Results) -> str:
    """How the verdicts keep their error rate with several checks, from the levels they used."""
    verdicts = [v.verdict for v in variant_models(results) if v.verdict is not None and v.verdict.fail_level]
    if not verdicts:
        return ""
    levels = ", ".join(fmt.level(level) for level in sorted({v.fail_level for v in verdicts}))
    return (
        f"A variant passes a check when its whole 95% interval is within the limit, and fails it only when its "
        f"interval at 1 \u2212 0.05/m (Bonferroni over its m quality checks: {levels} here) lies beyond it, so the "
        f"intervals that can reject a variant hold together with at least {fmt.level(verdicts[0].familywise_level)} "
        "confidence (family-wise)"
    )


def recommendation(results: Results) -> Recommendation:
    """The run's recommendation; a results.json from before schema 7 gets one made now, by the default preference."""
    return results.recommendation or recommend(results)


def headline(results: Results) -> str:
    """The one-line answer to "which do I serve?": the recommendation's sentence."""
    return f"Recommendation: {recommendation(results).reason}"


STANDING_RULE = (
    "A variant beats another only where it is better beyond the measured intervals and noise floors on mean KL, "
    "accuracy or perplexity, weight memory (by more than 1 %) or speed, and worse beyond them on none; the front is "
    "the variants no other beats. Of the variants that pass every check, the one best on the preferred quantity is "
    "recommended, and a tie goes to the smaller weight memory."
)


def standing_columns(results: Results) -> list[str]:
    quality = "PPL ratio [95% CI]" if is_text_run(results) else "Accuracy drop (loglik) [95% CI]"
    budget = recommendation(results).fit_gb
    fits = [f"Fits {budget:g} GiB"] if budget is not None else []
    return ["Candidate", "Verdict", "Mean KL (nats) [95% CI]", quality, "Weights", "Speed vs ref", *fits, "Standing"]


def standing_rows(results: Results) -> list[list[str]]:
    """One row per variant: what the recommendation compared, and whether another variant beats it."""
    rec = recommendation(results)
    text = is_text_run(results)
    rows = []
    for s in rec.standings:
        kl = fmt.nats_ci(s.mean_kl.value, s.mean_kl.ci) if s.mean_kl else fmt.NA
        if s.mean_kl and s.kl_is_lower_bound:
            kl = "≥ " + kl
        quality = s.perplexity_ratio if text else s.accuracy_drop
        quality_text = (
            fmt.number_ci(quality.value, quality.ci)
            if text and quality
            else fmt.points_ci(quality.value, quality.ci)
            if quality
            else fmt.NA
        )
        weights = fmt.nbytes(s.weight_bytes) + (" (stated)" if s.weight_stated else "")
        speed = f"{fmt.number_ci(s.speed.value, s.speed.ci)}×" if s.speed else fmt.NA
        fits = [] if rec.fit_gb is None else ["yes" if s.fits else "no" if s.fits is False else "not measured"]
        place = "recommended" if rec.outcome == "variant" and s.name == rec.serve else "on the front"
        if not s.on_front:
            place = f"beaten by {s.beaten_by}"
        if s.note:
            place += f" ({s.note})"
        rows.append([s.name, s.decision or "no verdict", kl, quality_text, weights, speed, *fits, place])
    return rows


# ------------------------------------------------------------------------------- accuracy & flips

ACCURACY_COLUMNS = [
    "Model",
    "Status",
    "Accuracy (loglik) [95% CI]",
    "Accuracy (generative) [95% CI]",
    "Unparsable",
    "\u0394 loglik [95% CI]",
    "Right\u2192wrong / wrong\u2192right",
    "McNemar p",
    "Same answer as ref",
    "Detectable \u0394 (80% power)",
    "\u0394 generative [95% CI]",
    *[metric.column for metric in ITEM_METRICS],
]


def accuracy_row(m: ModelResult) -> list[str]:
    ll, gen, pl, pg = m.loglik, m.generative, m.paired_loglik, m.paired_generative
    return [
        m.name,
        m.status,
        (fmt.percent_ci(ll.accuracy, ll.ci) + f" (n={ll.n})") if ll else fmt.NA,
        (fmt.percent_ci(gen.accuracy.accuracy, gen.accuracy.ci) + f" (n={gen.accuracy.n})") if gen else fmt.NA,
        fmt.integer(gen.unparsable) if gen else fmt.NA,
        fmt.points_ci(pl.difference, pl.difference_ci) if pl else fmt.NA,
        f"{pl.right_to_wrong} / {pl.wrong_to_right}" if pl else fmt.NA,
        fmt.pvalue(pl.mcnemar_p) if pl else fmt.NA,
        fmt.percent(pl.answer_agreement) if pl else fmt.NA,
        f"\u00b1{pl.min_detectable_difference * 100:.1f} pts" if pl else fmt.NA,
        fmt.points_ci(pg.difference, pg.difference_ci) if pg else fmt.NA,
        *[_item_metric_cell(m, metric) for metric in ITEM_METRICS],
    ]


def item_metric_notes() -> list[str]:
    """What each declared per-question column means, from its declaration."""
    return [
        f"{metric.column.partition(' [')[0]}: {metric.description}; "
        f"{'higher' if metric.higher_is_better else 'lower'} is better (informs, not judged)."
        for metric in ITEM_METRICS
    ]


def _item_metric_cell(m: ModelResult, metric: ItemMetric) -> str:
    estimate = m.item_metrics.get(metric.name)
    return fmt.in_unit(estimate.value, estimate.ci, metric.unit) if estimate else fmt.NA


def accuracy_rows(results: Results) -> list[list[str]]:
    return [accuracy_row(m) for m in results.models]


# ------------------------------------------------------------------------------ token agreement


def agreement_columns(text_run: bool = False) -> list[str]:
    """A text run compares every scored token, a question run one position per question."""
    return [
        "Variant",
        "Tokens" if text_run else "Items",
        "Top-1 agreement [95% CI]",
        "Mean KL [95% CI]",
        "Median / p90 / max KL",
        *[f"J@{k}" for k in TOP_K],
    ]


def agreement_rows(results: Results) -> list[list[str]]:
    rows = []
    for m in variant_models(results):
        ag = m.agreement
        if ag is None:
            rows.append([m.name, fmt.NA, fmt.NA, fmt.NA, fmt.NA, *[fmt.NA for _ in TOP_K]])
            continue
        top1 = ag.top1_agreement
        rows.append(
            [
                m.name,
                fmt.integer(ag.n),
                fmt.percent_ci(top1.value, top1.ci),
                _bound_mark(ag, fmt.nats_ci(ag.kl.mean.value, ag.kl.mean.ci)),
                _bound_mark(ag, f"{fmt.nats(ag.kl.median)} / {fmt.nats(ag.kl.p90)} / {fmt.nats(ag.kl.max)}"),
                *[fmt.fraction(jaccard_value(m, k)) for k in TOP_K],
            ]
        )
    return rows


# ----------------------------------------------------------------------------------- text corpus


def _stat_label(key: str) -> str:
    """llama-perplexity's name of a statistic: "99" -> "99.0%", "median" -> "Median"."""
    names = {"mean": "Mean", "max": "Maximum", "min": "Minimum", "median": "Median", "rms": "RMS"}
    return names.get(key) or f"{float(key):.1f}%"


KLD_KEYS = ("mean", *KL_PERCENTILES)
DELTA_P_KEYS = ("mean", *DELTA_P_PERCENTILES, "rms")
CORPUS_ROWS: list[tuple[str, str, str]] = [
    ("Mean PPL(Q)", "ppl", ""),
    ("Mean PPL(base)", "ppl_base", ""),
    ("Mean ln(PPL(Q)/PPL(base))", "log_ratio", ""),
    ("Mean PPL(Q)/PPL(base)", "ratio", ""),
    *[(f"{_stat_label(key)} KLD", "kl", key) for key in KLD_KEYS],
    *[(f"{_stat_label(key)} \u0394p", "delta_p", key) for key in DELTA_P_KEYS],
    ("Same top p", "same_top1", ""),
]
"""(label, statistic, key) of each row, in `llama-perplexity --kl-divergence`'s order and words."""

PUBLISHED_COLUMN = "llama.cpp's published Llama-3-8B Q8_0 / Q4_K_M (another model)"
PUBLISHED_LLAMA3_8B: dict[str, tuple[float, float]] = {
    "Mean PPL(Q)/PPL(base)": (1.000425, 1.028160),
    "Mean KLD": (0.001355, 0.031273),
    "Mean \u0394p": (-0.00019, -0.00596),
    "RMS \u0394p": (0.01198, 0.05519),
    "Same top p": (0.97674, 0.91901),
}
"""(Q8_0, Q4_K_M) against FP16 on Wikitext-2, from llama.cpp's tools/perplexity/README.md: orientation only."""
PUBLISHED_NOTE = (
    "The last column holds llama.cpp's published numbers for another model (Llama-3-8B quantized to Q8_0 and "
    "Q4_K_M, against its FP16 logits on Wikitext-2 with llama-perplexity's defaults; tools/perplexity/README.md), "
    "for orientation only: another model, corpus and context, not a measurement of this run"
)


def _format_statistic(kind: str, value: float | None, ci: Interval | None) -> str:
    if kind in ("ppl", "ppl_base", "ratio"):
        return fmt.number_ci(value, ci)
    if kind in ("log_ratio", "kl"):
        return fmt.nats_ci(value, ci)
    if kind == "delta_p":
        return fmt.percent_ci(value, ci, digits=3)
    return fmt.percent_ci(value, ci)


def _statistic(m: ModelResult, reference: ModelResult | None, kind: str, key: str) -> Estimate | None:
    corpus = m.corpus
    if kind == "ppl_base":
        return reference.corpus.perplexity if reference is not None and reference.corpus is not None else None
    if kind in ("kl", "delta_p"):
        return getattr(corpus, kind).get(key)
    return {
        "ppl": corpus.perplexity,
        "log_ratio": corpus.mean_log_ratio,
        "ratio": corpus.perplexity_ratio,
        "same_top1": corpus.same_top1,
    }[kind]


def corpus_variants(results: Results) -> list[ModelResult]:
    return [m for m in variant_models(results) if m.corpus is not None]


@dataclass(frozen=True)
class CorpusWording:
    """How a token-level run names what it scored, said once so every output (tables, notes, figure) agrees."""

    unit: str
    """What the intervals resample: "window" of a text, or "prompt"."""
    title: str
    size: str
    """How many sequences, and how long where they share a length: "4 windows of 128 tokens", "3 prompts"."""
    heading: str
    along: str
    """Where the scored tokens lie: "along the text", "along the reference's answers"."""

    @property
    def units(self) -> str:
        return f"{self.unit}s"


def corpus_wording(results: Results) -> CorpusWording:
    """The words for a text's windows or users' prompts, from `results.dataset`."""
    ds = results.dataset
    reference = reference_model(results)
    tokens = reference.corpus.tokens if reference is not None and reference.corpus is not None else None
    n = ds.n_items if ds is not None else None
    task = task_named(ds.kind) if ds is not None else None
    if task is None or not task.every_token:  # a text's words where no token-level kind is recorded
        task = task_named("text")
    unit = task.unit.removesuffix("s")
    size = f"{fmt.integer(n)} {unit}{'' if n == 1 else 's'}"
    if task.fixed_length:
        size += f" of {fmt.integer(ds.context if ds is not None else None)} tokens"
    title, how, along = task.title, task.how_scored, task.along
    return CorpusWording(unit, title, size, f"{title}: {size}, {how}: {fmt.integer(tokens)} scored tokens", along)


def corpus_columns(results: Results) -> list[str]:
    return ["Statistic", *[m.name for m in corpus_variants(results)], PUBLISHED_COLUMN]


def corpus_rows(results: Results) -> list[list[str]]:
    """One row per llama-perplexity statistic, one column per variant, then the published orientation."""
    reference = reference_model(results)
    variants = corpus_variants(results)
    if not variants:
        return []
    rows = []
    for label, kind, key in CORPUS_ROWS:
        cells = []
        for m in variants:
            estimate = _statistic(m, reference, kind, key)
            text = _format_statistic(kind, estimate.value if estimate else None, estimate.ci if estimate else None)
            cells.append(
                _bound_mark(m.agreement, text) if kind == "kl" and m.agreement is not None and estimate else text
            )
        published = PUBLISHED_LLAMA3_8B.get(label)
        rows.append(
            [label, *cells, " / ".join(_format_statistic(kind, v, None) for v in published) if published else ""]
        )
    return rows


def corpus_notes(results: Results) -> list[str]:
    """What the corpus table's numbers are, said once under it."""
    w = corpus_wording(results)
    notes = [
        f"Intervals are 95% and resample whole {w.units} (a {w.unit}'s tokens share their context, so they are not "
        "independent); a statistic without one had no spread to resample",
        "KLD is KL(reference \u2016 variant) per scored token in nats; \u0394p is p(variant) \u2212 p(reference) of "
        "the actual next token, in percent of probability; PPL(base) is the reference's",
    ]
    if w.unit == "prompt":
        notes.append(
            "Mean KLD averages each prompt's own mean, so every prompt counts once whatever its answer's length; "
            "the other statistics pool every scored token"
        )
    if any(m.agreement is not None and m.agreement.kl.store == "compact" for m in corpus_variants(results)):
        notes.append(
            "KL per token is estimated from the reference's compact store: its top K exactly, the tail from "
            "its stored samples"
        )
    short = [
        f"{m.name} ({fmt.integer(m.corpus.windows)})"
        for m in corpus_variants(results)
        if results.dataset is not None and m.corpus.windows != results.dataset.n_items
    ]
    if short:
        notes.append(f"Scored on fewer {w.units} than the run holds: " + ", ".join(short))
    notes.append(PUBLISHED_NOTE)
    return notes


_SPACES = re.compile(r"[^\S\n]+")
BLANK_TOKEN = "\u2423"
"""A token of spaces only, shown so it can be marked."""


def visible(text: str) -> str:
    """Text on one line that still shows its line breaks (\u23ce); other runs of whitespace become one space."""
    return _SPACES.sub(" ", text.replace("\r\n", "\n")).replace("\n", "\u23ce")


@dataclass
class WorstRow:
    """A sequence where a variant departs most. The snippet stays in three parts so each output marks the token its
    own way; spaces at the token's edges belong to its neighbours, since a marked space cannot be seen."""

    variant: str
    name: str
    cells: list[str]
    before: str
    token: str
    after: str


def worst_estimated(results: Results) -> bool:
    """Whether the worst spans' KL values (and so their order) are estimates from the compact store, not exact."""
    return any(span.worst_kl_lower is not None for m in corpus_variants(results) for span in m.corpus.worst)


def worst_columns(results: Results) -> list[str]:
    if worst_estimated(results):
        return [
            "Variant",
            corpus_wording(results).unit.capitalize(),
            "Scored tokens",
            "Mean KL (estimated ± s.e.)",
            "Top-1 agreement",
            "Worst token's KL (estimated ± s.e., bounds)",
            "Text around the worst token",
        ]
    return [
        "Variant",
        corpus_wording(results).unit.capitalize(),
        "Scored tokens",
        "Mean KL",
        "Top-1 agreement",
        "Worst token's KL",
        "Text around the worst token",
    ]


def _estimated_nats(
    value: float,
    se: float | None,
    estimated: bool,
    lower: float | None = None,
    upper: float | None = None,
    bounded: bool = False,
) -> str:
    """An estimated KL with its standard error, and its certain bounds where given:
    "0.0123 ± 0.0010 [0.0101, 0.812]"."""
    if not estimated:
        return fmt.nats(value)
    text = f"{fmt.nats(value)} ± {fmt.nats(se)}"
    if bounded:
        text += f" [{fmt.nats(lower)}, {fmt.nats(upper) if upper is not None else 'unbounded'}]"
    return text


def worst_rows(results: Results) -> list[WorstRow]:
    """Each variant's sequences with the highest mean KL; one with KL 0 at every token departs nowhere, so it is left
    out."""
    rows, estimated = [], worst_estimated(results)
    for m in corpus_variants(results):
        for span in m.corpus.worst:
            if span.worst_kl <= 0:
                continue
            token = visible(span.token)
            core = token.strip(" ") or BLANK_TOKEN
            lead = " " if token.startswith(" ") else ""
            trail = " " if token.endswith(" ") and core != BLANK_TOKEN else ""
            rows.append(
                WorstRow(
                    variant=m.name,
                    name=span.name,
                    cells=[
                        fmt.integer(span.tokens),
                        _estimated_nats(span.mean_kl, span.mean_kl_se, estimated),
                        fmt.percent(span.top1_agreement),
                        _estimated_nats(
                            span.worst_kl,
                            span.worst_kl_se,
                            estimated,
                            span.worst_kl_lower,
                            span.worst_kl_upper,
                            bounded=True,
                        ),
                    ],
                    before=_SPACES.sub(" ", visible(span.before) + lead),
                    token=core,
                    after=_SPACES.sub(" ", trail + visible(span.after)),
                )
            )
    return rows


def worst_notes(results: Results) -> list[str]:
    """How to read the worst-spans table, and which variants it leaves out for never departing."""
    w = corpus_wording(results)
    notes = [
        f"For each variant, the {w.units} with the highest mean KL (highest first), each with the text around its "
        "highest-KL token (marked); \u23ce is a line break"
    ]
    if worst_estimated(results):
        notes.append(
            "KL here is estimated from the reference's compact store (its top K exactly, the tail from its stored "
            "samples), so the values and the order are estimates: ± is each estimate's standard error, and "
            f"{w.units} within a few of them of each other may rank either way; brackets are the worst token's certain "
            "bounds. A damaged tail token that the sample missed is seen only by the bounds; "
            "--store full gives exact values and an exact ranking"
        )
    still = [
        m.name for m in corpus_variants(results) if m.corpus.worst and all(s.worst_kl <= 0 for s in m.corpus.worst)
    ]
    if still:
        notes.append(f"Not listed, KL 0 at every scored token: {', '.join(still)}")
    return notes


# ---------------------------------------------------------------------------------------- floors

FLOOR_COLUMNS = ["Floor", "What changed", "Measured", "Compare with"]


FREE_ANSWER_COLUMNS = [
    "Variant",
    "Same answer as the reference (95% CI)",
    "First different token: median [p25, p75]",
    "Length vs the reference",
    "Never stop",
    "Stop at under half",
]


def free_answer_rows(results: Results) -> list[list[str]]:
    """A prompts run: each variant's own greedy answers against the reference's (`analysis.free_answers`)."""
    rows = []
    for m in results.models:
        answers = m.free_answers
        if answers is None:
            continue
        spread = answers.first_divergence
        parted = (
            f"{spread['median']:g} [{spread['p25']:g}, {spread['p75']:g}] of {answers.diverged}" if spread else "never"
        )
        rows.append(
            [
                m.name,
                f"{answers.n - answers.diverged} of {answers.n}: "
                + fmt.percent_ci(answers.identical.value, answers.identical.ci),
                parted,
                fmt.ratio(answers.length_ratio),
                f"{answers.no_stop} (reference {answers.reference_no_stop})",
                str(answers.early_stop),
            ]
        )
    return rows


@dataclass
class DivergentRow:
    """An answer where a variant parts from the reference: the shared start, then each one's own rest."""

    variant: str
    name: str
    at: int
    shared: str
    reference: str
    variant_text: str


def divergent_rows(results: Results) -> list[DivergentRow]:
    return [
        DivergentRow(m.name, answer.name, answer.diverges_at, visible(answer.shared), visible(answer.reference_rest),
                     visible(answer.variant_rest))  # fmt: skip
        for m in results.models
        if m.free_answers is not None
        for answer in m.free_answers.most_divergent
    ]


def free_answer_notes(results: Results) -> list[str]:
    if not any(m.free_answers for m in results.models):
        return []
    limit = next(m.free_answers.max_new_tokens for m in results.models if m.free_answers)
    return [
        "each variant answered every prompt greedily itself, with the reference's chat template and stop tokens; "
        "token scoring above replays the reference's answers instead",
        f"never stop: answers that reach --max-new-tokens ({limit}) without a stop token",
        "these inform and do not decide the verdict",
    ]


def floor_rows(results: Results) -> list[list[str]]:
    """The reference's own noise, one row per floor, then each variant against the sampling floor."""
    rows = []
    for model in results.models:
        if (numeric := model.engine_floor) is not None:
            rows.append(
                [
                    f"numeric (batching): {model.name}",
                    f"{fmt.integer(numeric.n)} scored {numeric.batch_size} at a time and again one at a time",
                    f"mean KL {fmt.nats(numeric.kl_mean)}, max {fmt.nats(numeric.kl_max)}, "
                    f"top-1 {fmt.percent(numeric.top1_agreement)}",
                    "its mean KL and top-1 agreement (unclear where the noisier of its and the reference's floor "
                    "reaches a quarter of the KL limit)"
                    if model.role != "reference"
                    else "every variant's mean KL and top-1 agreement",
                ]
            )
    reference = reference_model(results)
    if reference is not None and reference.cost is not None and reference.cost.rounds > 1:
        clean = {
            p.batch_size: undisturbed_rounds(p.round_medians_s, p.round_disturbed, p.disturbed)
            for p in reference.cost.latency
        }
        spreads = {size: max(medians) / min(medians) for size, medians in clean.items() if len(medians) > 1}
        if spreads:
            rows.append(
                [
                    "timing (drift)",
                    f"reference's cost measured {reference.cost.rounds} times, in turn with the variants",
                    "between undisturbed rounds its forward latency moved by "
                    + ", ".join(f"{fmt.ratio(spread)} at batch {size}" for size, spread in sorted(spreads.items())),
                    "each variant's latency ratio and its 95% CI (batch sizes that moved by more than "
                    f"{fmt.ratio(DRIFT_TOLERANCE)} are not called faster or slower; elsewhere a claim needs the whole "
                    f"interval beyond this spread and beyond {fmt.ratio(DRIFT_TOLERANCE)})",
                ]
            )
    if sampling := results.floors.sampling:
        rows.append(
            [
                "sampling",
                f"reference's answers generated again, seed {sampling.seed}",
                f"{fmt.integer(sampling.disagreements)} of {fmt.integer(sampling.n)} answers differ "
                f"({fmt.percent(sampling.rate)})",
                "each variant's generated-answer disagreement",
            ]
        )
        for m in variant_models(results):
            if floor := m.generative_vs_floor:
                side = "above the floor" if floor.above_floor else "within the floor"
                rows.append(
                    [
                        f"{m.name} vs sampling",
                        "variant's generated answers against the reference's",
                        f"{fmt.integer(floor.variant_disagreements)} of {fmt.integer(floor.n)} differ "
                        f"(only the variant: {floor.variant_only}, only the resample: {floor.floor_only}), "
                        f"one-sided p {fmt.pvalue(floor.p_above_floor)}",
                        side,
                    ]
                )
    return rows


# ------------------------------------------------------------------------------------------ cost

COST_COLUMNS = [
    "Model",
    "Weights (counted)",
    "Bits / param",
    "vs ref",
    "Peak memory (largest ok batch)",
    "Forward latency, batch 1",
    "Latency vs ref, batch 1 (95% CI)",
    "Decode speed",
    "Decode speedup (95% CI)",
    "Time to first token",
    "Load time",
    "Threads",
    "OOM at batch",
]


def _latency_at(points: list[LatencyPoint], batch: int) -> LatencyPoint | None:
    for p in points:
        if p.batch_size == batch and p.status == "ok":
            return p
    return None


def ratio_with_ci(value: float | None, ci: Interval | None) -> str:
    """A variant/reference ratio with its interval: "0.80× (0.67×-0.96×)"."""
    if value is None:
        return fmt.NA
    return fmt.ratio(value) + (f" ({fmt.ratio(ci.low)}-{fmt.ratio(ci.high)})" if ci is not None else "")


def largest_ok_point(points: list[LatencyPoint]) -> LatencyPoint | None:
    ok = [p for p in points if p.status == "ok"]
    return max(ok, key=lambda p: p.batch_size) if ok else None


def cost_row(m: ModelResult) -> list[str]:
    c, cvr = m.cost, m.cost_vs_reference
    if c is None:
        return [m.name, *[fmt.NA] * (len(COST_COLUMNS) - 1)]
    top = largest_ok_point(c.latency)
    bs1 = _latency_at(c.latency, 1)
    ooms = sorted({p.batch_size for p in c.latency if p.status == "oom"})
    gen = c.generation
    if c.weights is None and c.stated_weight_bytes is not None:
        footprint = f"{fmt.nbytes(c.stated_weight_bytes)} (stated, not measured)"
    elif c.weights is None:
        footprint = "not measured (served)"
    else:
        footprint = fmt.nbytes(c.weights.counted_bytes) + (
            "" if c.weights.footprint_agrees else " (footprint disagrees)"
        )
    return [
        m.name,
        footprint,
        fmt.bits(c.weights.bits_per_parameter if c.weights else None),
        fmt.memory_vs_ref(cvr.weight_memory_ratio, cvr.memory_saving)
        if cvr
        else "reference"
        if m.quant is None
        else fmt.NA,
        f"{fmt.nbytes(top.peak_memory_bytes)} (batch {top.batch_size})" if top else fmt.NA,
        fmt.seconds(bs1.median_s)
        + (" (noisy)" if bs1.noisy else "")
        + (" (disturbed by other load)" if bs1.disturbed else "")
        if bs1
        else fmt.NA,
        ratio_with_ci(cvr.latency_ratio.get(1), cvr.latency_ratio_ci.get(1)) if cvr else fmt.NA,
        fmt.rate(gen.decode_tokens_per_s, "tok/s") if gen else fmt.NA,
        ratio_with_ci(cvr.decode_speedup, cvr.decode_speedup_ci) if cvr else fmt.NA,
        fmt.seconds(gen.time_to_first_token_s) if gen else fmt.NA,
        fmt.seconds(c.load_time_s),
        str(c.threads),
        ", ".join(str(b) for b in ooms) if ooms else "none",
    ]


def cost_rows(results: Results) -> list[list[str]]:
    return [cost_row(m) for m in results.models]


# ------------------------------------------------------------------------------------ serving

SERVING_COLUMNS = [
    "Model",
    "Concurrency",
    "Requests (failed)",
    "TTFT median / p90",
    "Inter-token median / p90",
    "End-to-end median / p90",
    "Output tokens / s",
]


def serving_rows(results: Results) -> list[list[str]]:
    """Client-side streaming figures of served models, one row per concurrency level."""
    rows = []
    for m in results.models:
        for point in m.cost.serving if m.cost else []:
            pairs = [
                (d.median_s, d.p90_s) if d else (None, None)
                for d in (point.time_to_first_token, point.inter_token_latency, point.end_to_end)
            ]
            rows.append(
                [
                    m.name,
                    str(point.concurrency),
                    f"{point.requests} ({point.failed})",
                    *[f"{fmt.seconds(median)} / {fmt.seconds(p90)}" for median, p90 in pairs],
                    fmt.rate(point.output_tokens_per_s, "tok/s"),
                ]
            )
    return rows


# ------------------------------------------------------------------------------------ generation

GENERATION_COLUMNS = [
    "Model",
    "Words / minute (end to end)",
    "Words / minute (decode only)",
    "Tokens / s (end to end)",
    "Mean output words",
    "Mean output tokens",
    "Unparsable",
]


def generation_rows(results: Results) -> list[list[str]]:
    rows = []
    for m in results.models:
        g = m.generative
        if g is None:
            continue
        rows.append(
            [
                m.name,
                fmt.number(g.words_per_minute),
                fmt.number(g.decode_words_per_minute),
                fmt.number(g.tokens_per_second),
                fmt.number(g.mean_output_words),
                fmt.number(g.mean_output_tokens),
                f"{g.unparsable} of {g.accuracy.n}",
            ]
        )
    return rows


# ---------------------------------------------------------------------------------- metrics.csv

CSV_COLUMNS = [
    "model", "role", "quant", "status", "decision",
    "loglik_n", "loglik_accuracy", "loglik_ci_low", "loglik_ci_high",
    "generative_n", "generative_accuracy", "generative_ci_low", "generative_ci_high", "generative_unparsable",
    "words_per_minute", "generation_tokens_per_s", "mean_output_words", "mean_output_tokens",
    "delta_loglik", "delta_loglik_ci_low", "delta_loglik_ci_high", "mcnemar_p_loglik",
    "right_to_wrong", "wrong_to_right", "answer_agreement", "min_detectable_difference",
    "delta_generative", "delta_generative_ci_low", "delta_generative_ci_high", "mcnemar_p_generative",
    *[f"{metric.name}{part}" for metric in ITEM_METRICS for part in ("", "_ci_low", "_ci_high")],
    "top1_agreement", "mean_kl", "mean_kl_ci_low", "mean_kl_ci_high", "median_kl", "p90_kl", "max_kl",
    "scored_tokens", "perplexity", "perplexity_ratio", "perplexity_ratio_ci_low", "perplexity_ratio_ci_high",
    "rms_delta_p", "kl_growth", "kl_growth_ci_low", *[f"jaccard_{k}" for k in TOP_K],
    "kl_bound", "weight_bytes", "footprint_bytes", "parameters", "bits_per_parameter",
    "weight_memory_ratio", "memory_saving",
    "decode_tokens_per_s", "decode_speedup", "decode_speedup_ci_low", "decode_speedup_ci_high",
    "latency_bs1_ratio", "latency_bs1_ratio_ci_low", "latency_bs1_ratio_ci_high",
    "time_to_first_token_s", "load_time_s", "load_peak_memory_bytes",
    "latency_bs1_median_s", "peak_memory_bytes_max_ok_batch", "max_ok_batch", "oom_batches", "threads",
    "compute_dtype", "offloaded",
]  # fmt: skip


def metrics_row(m: ModelResult, ref: ModelResult | None) -> dict[str, object]:
    ll, gen, pl, pg, ag = m.loglik, m.generative, m.paired_loglik, m.paired_generative, m.agreement
    c, cvr = m.cost, m.cost_vs_reference
    top = largest_ok_point(c.latency) if c else None
    bs1 = _latency_at(c.latency, 1) if c else None
    row: dict[str, object] = {
        "model": m.name,
        "role": "reference" if m is ref else "variant",
        "quant": m.quant,
        "status": m.status,
        "decision": m.verdict.decision if m.verdict else None,
        "loglik_n": ll.n if ll else None,
        "loglik_accuracy": ll.accuracy if ll else None,
        "loglik_ci_low": ll.ci.low if ll else None,
        "loglik_ci_high": ll.ci.high if ll else None,
        "generative_n": gen.accuracy.n if gen else None,
        "generative_accuracy": gen.accuracy.accuracy if gen else None,
        "generative_ci_low": gen.accuracy.ci.low if gen else None,
        "generative_ci_high": gen.accuracy.ci.high if gen else None,
        "generative_unparsable": gen.unparsable if gen else None,
        "words_per_minute": gen.words_per_minute if gen else None,
        "generation_tokens_per_s": gen.tokens_per_second if gen else None,
        "mean_output_words": gen.mean_output_words if gen else None,
        "mean_output_tokens": gen.mean_output_tokens if gen else None,
        "delta_loglik": pl.difference if pl else None,
        "delta_loglik_ci_low": pl.difference_ci.low if pl else None,
        "delta_loglik_ci_high": pl.difference_ci.high if pl else None,
        "mcnemar_p_loglik": pl.mcnemar_p if pl else None,
        "right_to_wrong": pl.right_to_wrong if pl else None,
        "wrong_to_right": pl.wrong_to_right if pl else None,
        "answer_agreement": pl.answer_agreement if pl else None,
        "min_detectable_difference": pl.min_detectable_difference if pl else None,
        "delta_generative": pg.difference if pg else None,
        "delta_generative_ci_low": pg.difference_ci.low if pg else None,
        "delta_generative_ci_high": pg.difference_ci.high if pg else None,
        "mcnemar_p_generative": pg.mcnemar_p if pg else None,
        "top1_agreement": ag.top1_agreement.value if ag else None,
        "mean_kl": ag.kl.mean.value if ag else None,
        "mean_kl_ci_low": ag.kl.mean.ci.low if ag and ag.kl.mean.ci else None,
        "mean_kl_ci_high": ag.kl.mean.ci.high if ag and ag.kl.mean.ci else None,
        "median_kl": ag.kl.median if ag else None,
        "p90_kl": ag.kl.p90 if ag else None,
        "max_kl": ag.kl.max if ag else None,
        **_corpus_columns(m),
        **_item_metric_columns(m),
        **{f"jaccard_{k}": jaccard_value(m, k) for k in TOP_K},
        "weight_bytes": c.weights.counted_bytes if c and c.weights else None,
        "footprint_bytes": c.weights.footprint_bytes if c and c.weights else None,
        "parameters": c.weights.parameters if c and c.weights else None,
        "bits_per_parameter": c.weights.bits_per_parameter if c and c.weights else None,
        "kl_bound": ("lower" if ag.kl.is_lower_bound else "estimate" if ag.kl.lower is not None else "exact")
        if ag
        else None,
        "weight_memory_ratio": cvr.weight_memory_ratio if cvr else None,
        "memory_saving": cvr.memory_saving if cvr else None,
        "decode_tokens_per_s": c.generation.decode_tokens_per_s if c and c.generation else None,
        "decode_speedup": cvr.decode_speedup if cvr else None,
        "decode_speedup_ci_low": cvr.decode_speedup_ci.low if cvr and cvr.decode_speedup_ci else None,
        "decode_speedup_ci_high": cvr.decode_speedup_ci.high if cvr and cvr.decode_speedup_ci else None,
        "latency_bs1_ratio": cvr.latency_ratio.get(1) if cvr else None,
        "latency_bs1_ratio_ci_low": cvr.latency_ratio_ci[1].low if cvr and 1 in cvr.latency_ratio_ci else None,
        "latency_bs1_ratio_ci_high": cvr.latency_ratio_ci[1].high if cvr and 1 in cvr.latency_ratio_ci else None,
        "time_to_first_token_s": c.generation.time_to_first_token_s if c and c.generation else None,
        "load_time_s": c.load_time_s if c else None,
        "load_peak_memory_bytes": c.load_peak_memory_bytes if c else None,
        "latency_bs1_median_s": bs1.median_s if bs1 else None,
        "peak_memory_bytes_max_ok_batch": top.peak_memory_bytes if top else None,
        "max_ok_batch": top.batch_size if top else None,
        "oom_batches": " ".join(str(p.batch_size) for p in c.latency if p.status == "oom") if c else None,
        "threads": c.threads if c else None,
        "compute_dtype": m.precision.compute_dtype if m.precision else None,
        "offloaded": m.precision.offloaded if m.precision else None,
    }
    return row


def _item_metric_columns(m: ModelResult) -> dict[str, object]:
    columns: dict[str, object] = {}
    for metric in ITEM_METRICS:
        estimate = m.item_metrics.get(metric.name)
        ci = estimate.ci if estimate else None
        columns[metric.name] = estimate.value if estimate else None
        columns[f"{metric.name}_ci_low"], columns[f"{metric.name}_ci_high"] = (ci.low, ci.high) if ci else (None, None)
    return columns


def _corpus_columns(m: ModelResult) -> dict[str, object]:
    """A text or prompts run's own numbers (empty for questions)."""
    corpus = m.corpus
    ratio = corpus.perplexity_ratio if corpus else None
    return {
        "scored_tokens": corpus.tokens if corpus else None,
        "perplexity": corpus.perplexity.value if corpus else None,
        "perplexity_ratio": ratio.value if ratio else None,
        "perplexity_ratio_ci_low": ratio.ci.low if ratio and ratio.ci else None,
        "perplexity_ratio_ci_high": ratio.ci.high if ratio and ratio.ci else None,
        "rms_delta_p": corpus.delta_p["rms"].value if corpus and "rms" in corpus.delta_p else None,
        "kl_growth": corpus.kl_growth.value if corpus and corpus.kl_growth else None,
        "kl_growth_ci_low": corpus.kl_growth.ci.low if corpus and corpus.kl_growth and corpus.kl_growth.ci else None,
    }


def metrics_csv(results: Results) -> str:
    """metrics.csv as text: one row per model, raw numbers (empty cell = not measured)."""
    ref = reference_model(results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for m in results.models:
        row = metrics_row(m, ref)
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


# ------------------------------------------------------------------------------- per-layer sensitivity

LAYER_COLUMNS = ["Layer (the only one quantized)", "Mean KL (nats) [95% CI]", "Top-1 agreement", "Answer flips"]
PROPOSAL_COLUMNS = [
    "Variant",
    "Layers kept",
    "Predicted mean KL",
    "Measured mean KL [95% CI]",
    "Verdict",
    "Weights",
    "Serve with",
]
SHOWN_LAYERS = 5


def layer_rows(table: SensitivityTable) -> list[list[str]]:
    """The most sensitive layers, highest mean KL first (the figure has them all), then each tensor outside the decoder
    blocks that the method quantizes (never kept by a proposal)."""
    return [
        [
            f"{layer.name} ({layer.index})" if layer.index >= 0 else f"{layer.name} (outside the blocks)",
            fmt.nats_ci(layer.kl.value, layer.kl.ci),
            fmt.percent(layer.top1_agreement),
            str(layer.answer_flips),
        ]
        for layer in [*table.layers[:SHOWN_LAYERS], *table.outside]
    ]


def proposal_rows(table: SensitivityTable, results: Results) -> list[list[str]]:
    """The plain method, then each proposal in the order measured: predicted beside measured, with its verdict."""
    models = {m.name: m for m in results.models}

    def measured(name: str) -> tuple[str, str]:
        model = models.get(name)
        weights = model.cost.weight_bytes if model and model.cost else None
        return (model.verdict.decision if model and model.verdict else "not measured", fmt.nbytes(weights))

    rows = [
        [
            table.method,
            "0",
            f"{fmt.nats(table.predicted_variant_kl)} (layers summed)",
            fmt.nats_ci(table.measured_variant_kl.value, table.measured_variant_kl.ci)
            if table.measured_variant_kl
            else fmt.NA,
            *measured(table.method),
            "",
        ]
    ]
    for proposal in table.proposals:
        kl = proposal.measured_kl
        rows.append(
            [
                proposal.variant,
                str(len(proposal.keep)),
                fmt.nats(proposal.predicted_kl),
                fmt.nats_ci(kl.value, kl.ci) if kl else fmt.NA,
                *measured(proposal.variant),
                proposal.serve,
            ]
        )
    return rows
