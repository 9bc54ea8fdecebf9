"""`report.md`: the verdict, key numbers and figures, ready to paste into a pull request.

Tables come from :mod:`quantcheck.report.table`, so every number reads as in the HTML report.
Figures are referenced as relative files (``figures/<name>.png``) next to the Markdown file.
"""

from __future__ import annotations

import re

from quantcheck.report import table
from quantcheck.report.data import RunData
from quantcheck.report.plots import FIGURES_DIR, SERVE_FIGURE, FigureSpec
from quantcheck.report.sections import environment_rows, missing_notes, run_title, warning_rows

_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_cell(text: object) -> str:
    """Make untrusted text safe inside a Markdown table cell (no pipes, no newlines, no raw tags)."""
    s = " ".join(str(text).split())
    s = s.replace("\\", "\\\\").replace("|", "\\|")
    return _TAG_START.sub("&lt;", s)


def md_text(text: object) -> str:
    """Untrusted text on its own line: one line, no raw HTML tags."""
    return _TAG_START.sub("&lt;", " ".join(str(text).split()))


def md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    return lines


def parse_md_table(text: str, first_header: str, with_column: str | None = None) -> list[list[str]]:
    """Rows of the first Markdown table whose first header cell is `first_header` (and which has a
    column `with_column`, when given). For tests and tools that read report.md back."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = _split_row(line)
        if cells and cells[0] == first_header and (with_column is None or with_column in cells):
            rows = []
            for row_line in lines[i + 2 :]:
                if not row_line.startswith("|"):
                    break
                rows.append(_split_row(row_line))
            return rows
    raise ValueError(f"no table with first column {first_header!r}")


def _split_row(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|").replace("\\\\", "\\") for c in cells]


def render_markdown(
    data: RunData,
    figures: dict[str, str],
    specs: list[FigureSpec],
    skipped_figures: dict[str, str],
) -> str:
    """The whole report.md. `figures` maps figure key -> file name inside figures/."""
    r = data.results
    out: list[str] = [f"# {md_text(run_title(r))}", ""]
    out += [f"**{md_text(table.headline(r))}**", ""]
    if not r.finished or r.missing:
        state = "not finished" if not r.finished else "partial"
        extra = f"; missing: {', '.join(r.missing)}" if r.missing else ""
        out += [f"> \u26a0\ufe0f This run is {state}{md_text(extra)}. See *What is missing* below.", ""]
    if standings := table.standing_rows(r):
        out += ["## Which variant to serve", ""]
        out += md_table(table.standing_columns(r), standings)
        out += ["", md_text(table.STANDING_RULE), ""]
        out += [f"- To settle: {md_text(advice)}." for advice in table.recommendation(r).settle]
        if SERVE_FIGURE in figures:
            out += ["", f"![Quality lost vs weight memory]({FIGURES_DIR}/{figures[SERVE_FIGURE]})"]
        out.append("")

    if data.sensitivity is not None:
        out += _sensitivity_section(data, figures)
    out += ["## Verdict", ""]
    rows = table.verdict_rows(r)
    if rows:
        out += md_table(table.verdict_columns(r), [row.cells(data.is_text) for row in rows])
        out.append("")
        for row in rows:
            line = f"- **{md_text(row.name)}** \u2014 {row.decision}"
            if row.summary:
                line += f": {md_text(row.summary)}"
            out.append(line)
            for reason in row.reasons:
                out.append(f"  - {md_text(reason)}")
            for err in row.errors:
                out.append(f"  - error: `{md_text(err).replace('`', chr(39))}`")
        out.append("")
    else:
        out += ["No quantized variant in this run.", ""]
    out += [f"Thresholds: {table.thresholds_text(r)}.", ""]
    if familywise := table.familywise_text(r):
        out += [f"{familywise}.", ""]

    if data.is_text:
        out += _corpus_section(data)
    out += ["## Key numbers", ""]
    if not data.is_text:
        out += ["### Accuracy and flips (same items, paired)", ""]
        out += md_table(table.ACCURACY_COLUMNS, table.accuracy_rows(r)) + [""]
        out += [f"_{note}_" for note in table.item_metric_notes()] + [""]
    agreement = table.agreement_rows(r)
    if agreement:
        out += ["### Next-token agreement with the reference", ""]
        out += md_table(table.agreement_columns(data.is_text), agreement) + [""]
    if floors := table.floor_rows(r):
        out += ["### Noise floors: the reference against itself", ""]
        out += md_table(table.FLOOR_COLUMNS, floors) + [""]
    out += ["### Cost", ""]
    out += md_table(table.COST_COLUMNS, table.cost_rows(r)) + [""]
    serving = table.serving_rows(r)
    if serving:
        out += ["### Served models (client side, streaming)", ""]
        out += md_table(table.SERVING_COLUMNS, serving) + [""]
    gen = table.generation_rows(r)
    if gen:
        out += [
            "### Generation speed",
            "",
            "End-to-end words per minute include prefill and batching and depend on answer length; "
            "decode-only words per minute come from the cost phase's fixed-length decode rate.",
            "",
        ]
        out += md_table(table.GENERATION_COLUMNS, gen) + [""]

    if figures:
        out += ["## Figures", ""]
        for spec in specs:
            if spec.key in figures:
                out += [f"![{spec.title}]({FIGURES_DIR}/{figures[spec.key]})", "", f"*{spec.caption_for(r)}*", ""]

    warnings = warning_rows(r)
    out += ["## Warnings", ""]
    if warnings:
        out += [f"- **{md_text(code)}** ({md_text(model)}): {md_text(msg)}" for code, model, msg in warnings]
    else:
        out.append("No warnings.")
    out.append("")

    notes = missing_notes(data, skipped_figures)
    if notes:
        out += ["## What is missing", ""]
        for note in notes:
            out.append(f"- {md_text(note.text)}")
            for d in note.details:
                out.append(f"  - `{md_text(d).replace('`', chr(39))}`")
        out.append("")

    out += ["## Environment", ""]
    out += md_table(["Setting", "Value"], [[k, v] for k, v in environment_rows(data)])
    if data.is_text:
        out += [
            "",
            "_Full report: `report.html` in the run folder; raw numbers: `metrics.csv`; "
            "per-token records: `models/<model>/corpus.jsonl`._",
            "",
        ]
    else:
        out += [
            "",
            "_Full report with per-item answers: `report.html` in the run folder; raw numbers: `metrics.csv`._",
            "",
        ]
    return "\n".join(out)


def _corpus_section(data: RunData) -> list[str]:
    """A token-level run's statistics in llama-perplexity's layout, its notes once under the table, then where each
    variant departs most."""
    r = data.results
    out = [f"## {md_text(table.corpus_wording(r).heading)}", ""]
    rows = table.corpus_rows(r)
    if not rows:
        return out + ["No variant has corpus statistics.", ""]
    out += md_table(table.corpus_columns(r), rows) + [""]
    out += [f"- {md_text(note)}." for note in table.corpus_notes(r)] + [""]
    worst = table.worst_rows(r)
    if worst:
        out += ["### Where the variants depart most", ""]
        out += md_table(table.worst_columns(r), [])
        out += [
            f"| {' | '.join(md_cell(c) for c in [w.variant, w.name, *w.cells])} | {_md_snippet(w)} |" for w in worst
        ] + [""]
        out += [f"- {md_text(note)}." for note in table.worst_notes(r)] + [""]
    if free := table.free_answer_rows(r):
        out += ["### What each variant answers on its own", ""]
        out += md_table(table.FREE_ANSWER_COLUMNS, free) + [""]
        for row in table.divergent_rows(r):
            out += [
                f"- **{md_text(row.variant)}**, {md_text(row.name)}, parts at answer token {row.at}: "
                f"“{md_text(row.shared)}” then the reference “{md_text(row.reference)}”, "
                f"{md_text(row.variant)} “{md_text(row.variant_text)}”"
            ]
        out += [""] + [f"- {md_text(note)}." for note in table.free_answer_notes(r)] + [""]
    return out


_EMPHASIS = re.compile(r"([*_`])")


def _md_snippet(row: table.WorstRow) -> str:
    """The snippet with its token in bold: the text's own emphasis characters are escaped so only the marks bold;
    spaces at the token's edges stay outside the marks, which Markdown needs to see them as bold."""
    before, token, after = (_EMPHASIS.sub(r"\\\1", md_cell(part)) for part in (row.before, row.token, row.after))
    left = " " if row.before.endswith(" ") and before else ""
    right = " " if row.after.startswith(" ") and after else ""
    return f"{before}{left}**{token}**{right}{after}"


def _sensitivity_section(data: RunData, figures: dict[str, str]) -> list[str]:
    """`quantcheck sensitivity`'s ranking and its measured proposals."""
    sensitivity = data.sensitivity
    out = [f"## Per-layer sensitivity: {md_text(sensitivity.method)}", ""]
    out += md_table(table.LAYER_COLUMNS, table.layer_rows(sensitivity))
    beyond = f" and {len(sensitivity.outside)} tensors outside them" if sensitivity.outside else ""
    scored = f"{len(sensitivity.layers)} decoder layers{beyond} scored one at a time in {sensitivity.seconds:.0f} s."
    out += ["", md_text(scored), ""]
    out += md_table(table.PROPOSAL_COLUMNS, table.proposal_rows(sensitivity, data.results))
    if "sensitivity" in figures:
        out += ["", f"![Per-layer sensitivity]({FIGURES_DIR}/{figures['sensitivity']})"]
    return [*out, ""]
