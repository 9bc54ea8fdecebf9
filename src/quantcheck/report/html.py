"""`report.html`: one self-contained file (inline CSS, PNGs as data URIs, a tiny inline script).

Model outputs and dataset text are untrusted: the jinja2 environment autoescapes everything and
per-row data for the script travels as JSON in single-quoted data attributes (``|tojson``).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from quantcheck.report import table
from quantcheck.report.data import RunData
from quantcheck.report.plots import SERVE_FIGURE, FigureSpec
from quantcheck.report.sections import config_rows, environment_rows, missing_notes, run_title, warning_rows
from quantcheck.schema.results import ItemRecord

TEMPLATES = Path(__file__).parent / "templates"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_ITEM_ROWS = 3000  # beyond this, rows where no variant differs are dropped first


@dataclass
class AnswerCell:
    model: str
    pred: str
    correct: bool | None
    differs: bool
    gen_pred: str | None = None  # parsed generative answer, "unparsable", or None when not generated
    gen_correct: bool | None = None


@dataclass
class ItemRow:
    item_id: str
    subject: str
    question: str
    choices: list[tuple[str, str]]
    answer: str
    reference: AnswerCell | None
    variants: list[AnswerCell]
    differs: list[str]
    generated: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ItemTable:
    reference: str
    variants: list[str]
    rows: list[ItemRow]
    total: int
    n_differing: int
    truncated: bool


def _gen_pred(rec: ItemRecord | None) -> str | None:
    if rec is None or rec.generative is None:
        return None
    return rec.generative.pred if rec.generative.pred is not None else "unparsable"


def variant_differs(ref: ItemRecord | None, var: ItemRecord | None) -> bool:
    """A variant's answer differs from the reference on this item (log-likelihood or generated)."""
    if ref is None or var is None:
        return False
    if ref.loglik is not None and var.loglik is not None and ref.loglik.pred != var.loglik.pred:
        return True
    ref_gen, var_gen = _gen_pred(ref), _gen_pred(var)
    return ref_gen is not None and var_gen is not None and ref_gen != var_gen


def _cell(model: str, rec: ItemRecord | None, differs: bool) -> AnswerCell:
    if rec is None:
        return AnswerCell(model=model, pred="\u2014", correct=None, differs=False)
    pred = rec.loglik.pred if rec.loglik is not None else "\u2014"
    correct = rec.loglik.correct if rec.loglik is not None else None
    return AnswerCell(
        model=model,
        pred=pred,
        correct=correct,
        differs=differs,
        gen_pred=_gen_pred(rec),
        gen_correct=rec.generative.correct if rec.generative is not None else None,
    )


def item_table(data: RunData, max_rows: int = MAX_ITEM_ROWS) -> ItemTable | None:
    """The per-item comparison, or None when items.jsonl has nothing to show."""
    if not data.items:
        return None
    ref = data.reference
    ref_name = ref.name if ref is not None else "reference"
    by_item: dict[str, dict[str, ItemRecord]] = {}
    order: list[str] = []
    for rec in data.items:
        if rec.item_id not in by_item:
            by_item[rec.item_id] = {}
            order.append(rec.item_id)
        by_item[rec.item_id][rec.model] = rec
    # dataset order first when known, then anything only in items.jsonl
    if data.dataset:
        known = [i for i in data.dataset if i in by_item]
        order = known + [i for i in order if i not in data.dataset]
    models_with_items = {rec.model for rec in data.items}
    variants = [m.name for m in data.results.models if m.name != ref_name and m.name in models_with_items]
    variants += sorted(models_with_items - set(variants) - {ref_name})

    rows: list[ItemRow] = []
    for item_id in order:
        recs = by_item[item_id]
        ref_rec = recs.get(ref_name)
        ds = data.dataset.get(item_id)
        any_rec = next(iter(recs.values()))
        differs = [v for v in variants if variant_differs(ref_rec, recs.get(v))]
        generated = [
            (name, recs[name].generative.text)
            for name in [ref_name, *variants]
            if name in recs and recs[name].generative is not None
        ]
        rows.append(
            ItemRow(
                item_id=item_id,
                subject=ds.subject if ds else "",
                question=ds.question if ds else "",
                choices=[(LETTERS[i] if i < len(LETTERS) else str(i + 1), c) for i, c in enumerate(ds.choices)]
                if ds
                else [],
                answer=(ds.answer if ds and ds.answer else any_rec.answer),
                reference=_cell(ref_name, ref_rec, False) if ref_rec is not None else None,
                variants=[_cell(v, recs.get(v), v in differs) for v in variants],
                differs=differs,
                generated=generated,
            )
        )
    total = len(rows)
    n_differing = sum(1 for r in rows if r.differs)
    truncated = total > max_rows
    if truncated:
        keep_same = max(0, max_rows - n_differing)
        kept, same_kept = [], 0
        for r in rows:
            if r.differs:
                kept.append(r)
            elif same_kept < keep_same:
                kept.append(r)
                same_kept += 1
        rows = kept
    return ItemTable(
        reference=ref_name, variants=variants, rows=rows, total=total, n_differing=n_differing, truncated=truncated
    )


_BREAK_BEFORE = re.compile(r" (?=[\[(])")


def nobreak(value: object) -> Markup:
    """Escape a formatted number and let it wrap only before "[" or "(" (never inside "[a, b]")."""
    parts = _BREAK_BEFORE.split(str(value))
    return Markup(" ").join(Markup('<span class="nw">%s</span>') % escape(p) for p in parts)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["nobreak"] = nobreak
    return env


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render_html(
    data: RunData,
    figures: dict[str, Path],
    specs: list[FigureSpec],
    skipped_figures: dict[str, str],
    colors: dict[str, str],
) -> str:
    r = data.results
    fig_ctx = [
        {"key": s.key, "title": s.title, "caption": s.caption_for(r), "src": data_uri(figures[s.key])}
        for s in specs
        if s.key in figures
    ]
    verdicts = table.verdict_rows(r)
    template = _environment().get_template("report.html.j2")
    return template.render(
        title=run_title(r),
        headline=table.headline(r),
        standing_columns=table.standing_columns(r),
        standing_rows=table.standing_rows(r),
        standing_rule=table.STANDING_RULE,
        settle=table.recommendation(r).settle,
        results=r,
        finished=r.finished,
        missing_sections=r.missing,
        is_text=data.is_text,
        verdicts=verdicts,
        verdict_columns=table.verdict_columns(r),
        thresholds=table.thresholds_text(r),
        familywise=table.familywise_text(r),
        colors=colors,
        sensitivity=data.sensitivity,
        layer_columns=table.LAYER_COLUMNS,
        layer_rows=table.layer_rows(data.sensitivity) if data.sensitivity else [],
        proposal_columns=table.PROPOSAL_COLUMNS,
        proposal_rows=table.proposal_rows(data.sensitivity, r) if data.sensitivity else [],
        serve_figure=next((f for f in fig_ctx if f["key"] == SERVE_FIGURE), None),
        figures=[f for f in fig_ctx if f["key"] != SERVE_FIGURE],
        skipped_figures=skipped_figures,
        accuracy_columns=table.ACCURACY_COLUMNS,
        accuracy_rows=table.accuracy_rows(r),
        item_metric_notes=table.item_metric_notes(),
        corpus=table.corpus_wording(r) if data.is_text else None,
        corpus_columns=table.corpus_columns(r),
        corpus_rows=table.corpus_rows(r),
        corpus_notes=table.corpus_notes(r),
        worst_columns=table.worst_columns(r),
        worst_rows=table.worst_rows(r),
        worst_notes=table.worst_notes(r),
        free_answer_columns=table.FREE_ANSWER_COLUMNS,
        free_answer_rows=table.free_answer_rows(r),
        divergent_rows=table.divergent_rows(r),
        free_answer_notes=table.free_answer_notes(r),
        agreement_columns=table.agreement_columns(data.is_text),
        agreement_rows=table.agreement_rows(r),
        floor_columns=table.FLOOR_COLUMNS,
        floor_rows=table.floor_rows(r),
        cost_columns=table.COST_COLUMNS,
        cost_rows=table.cost_rows(r),
        serving_columns=table.SERVING_COLUMNS,
        serving_rows=table.serving_rows(r),
        generation_columns=table.GENERATION_COLUMNS,
        generation_rows=table.generation_rows(r),
        warnings=warning_rows(r),
        missing=missing_notes(data, skipped_figures),
        environment=environment_rows(data),
        config=config_rows(r),
        items=None if data.is_text else item_table(data),
        has_items_file=data.has_items_file,
    )
