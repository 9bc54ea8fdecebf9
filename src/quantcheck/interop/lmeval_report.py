"""What `quantcheck compare-lmeval` writes: `comparison.json` for tools and `report.md` for people.

Only accuracy is compared here (lm-eval logs no cost and no full next-token distributions), so the
verdict is the accuracy rule of `quantcheck.analysis.verdict` alone, named for what it can show: whether the
variant keeps the reference's accuracy on these documents, not whether to quantize.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from quantcheck.analysis import format as fmt
from quantcheck.errors import ResultsFolderError
from quantcheck.interop.lmeval import Comparison, LmEvalRun, TaskComparison, task_label
from quantcheck.report.markdown import md_table, md_text
from quantcheck.schema.results import QUANTCHECK_VERSION, PairedComparison
from quantcheck.storage.store import write_json_atomic, write_text_atomic

JSON_FILE = "comparison.json"
MARKDOWN_FILE = "report.md"

AccuracyVerdict = Literal["KEEPS ACCURACY", "LOSES ACCURACY", "INCONCLUSIVE"]
VERDICTS: dict[str, AccuracyVerdict] = {"pass": "KEEPS ACCURACY", "fail": "LOSES ACCURACY", "unclear": "INCONCLUSIVE"}

COLUMNS = [
    "Task",
    "Metric",
    "n",
    "Reference",
    "Variant",
    "\u0394 [95% CI]",
    "Right\u2192wrong / wrong\u2192right",
    "McNemar p",
    "Same answer",
    "Detectable \u0394 (80% power)",
    "Verdict",
]


class RunSource(BaseModel):
    folder: str
    model: str


class TaskResult(BaseModel):
    """One task (or all tasks pooled): the paired comparison and the accuracy verdict on it."""

    task: str
    filter: str
    metric: str
    verdict: AccuracyVerdict
    reason: str
    advice: str | None = None
    paired: PairedComparison
    reference_file: str | None = Field(description="the lm-eval samples file read; None for the pooled row")
    variant_file: str | None


class LmEvalComparisonFile(BaseModel):
    """The whole of `comparison.json`: the variant run (B) against the reference run (A)."""

    schema_version: int = 1
    tool_version: str
    created_at: str
    reference: RunSource
    variant: RunSource
    max_accuracy_drop: float = Field(description="the accuracy-drop limit of the verdicts, as a fraction")
    verdict: AccuracyVerdict | None = Field(
        description="of the pooled row, or of the only task; None when tasks must be read one by one"
    )
    tasks: list[TaskResult]
    pooled: TaskResult | None
    skipped: list[str] = Field(description="shared tasks not compared, and why")
    only_reference: list[str]
    only_variant: list[str]

    @property
    def main(self) -> TaskResult | None:
        """The result the overall verdict rests on: the pooled row, or the only task."""
        return self.pooled or (self.tasks[0] if len(self.tasks) == 1 else None)

    @property
    def rows(self) -> list[TaskResult]:
        """Every result in table order: the tasks, then the pooled row."""
        return [*self.tasks, *([self.pooled] if self.pooled else [])]


def _source(run: LmEvalRun) -> RunSource:
    return RunSource(folder=str(run.folder), model=run.model)


def _task_result(comparison: Comparison, task: TaskComparison, pooled: bool) -> TaskResult:
    def file(run: LmEvalRun) -> str | None:
        return None if pooled else str(run.tasks[(task.task, task.filter)].path)

    return TaskResult(
        task=task.task,
        filter=task.filter,
        metric=task.metric,
        verdict=VERDICTS[task.check.outcome],
        reason=task.check.reason,
        advice=task.check.advice,
        paired=task.paired,
        reference_file=file(comparison.reference),
        variant_file=file(comparison.variant),
    )


def comparison_file(comparison: Comparison) -> LmEvalComparisonFile:
    document = LmEvalComparisonFile(
        tool_version=QUANTCHECK_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        reference=_source(comparison.reference),
        variant=_source(comparison.variant),
        max_accuracy_drop=comparison.thresholds.max_accuracy_drop,
        verdict=None,
        tasks=[_task_result(comparison, task, pooled=False) for task in comparison.tasks],
        pooled=_task_result(comparison, comparison.pooled, pooled=True) if comparison.pooled else None,
        skipped=comparison.skipped,
        only_reference=comparison.only_reference,
        only_variant=comparison.only_variant,
    )
    document.verdict = document.main.verdict if document.main else None
    return document


def row(result: TaskResult) -> list[str]:
    """One table row, every number formatted as in quantcheck's own report."""
    p = result.paired
    return [
        task_label(result.task, result.filter),
        result.metric,
        fmt.integer(p.n),
        fmt.percent(p.reference_accuracy),
        fmt.percent(p.variant_accuracy),
        fmt.points_ci(p.difference, p.difference_ci),
        f"{p.right_to_wrong} / {p.wrong_to_right}",
        fmt.pvalue(p.mcnemar_p),
        fmt.percent(p.answer_agreement),
        f"\u00b1{fmt.number(p.min_detectable_difference * 100)} pts",
        result.verdict,
    ]


def headline(document: LmEvalComparisonFile) -> str:
    """One line: what the comparison as a whole shows."""
    single = document.main
    if single is None:
        return (
            f"{document.variant.model} against {document.reference.model}: {len(document.tasks)} tasks, "
            "read each verdict below"
        )
    return f"{document.variant.model} against {document.reference.model}: {single.verdict} \u2014 {single.reason}"


def not_compared(document: LmEvalComparisonFile) -> list[str]:
    """Tasks left out of the comparison, each with why: a reader must not take the table for all of both runs."""
    notes = [f"not compared: {text}" for text in document.skipped]
    notes += [f"only in the reference run: {task}" for task in document.only_reference]
    return notes + [f"only in the variant run: {task}" for task in document.only_variant]


def render_markdown(document: LmEvalComparisonFile) -> str:
    out = [f"# lm-eval comparison: {md_text(document.variant.model)} against {md_text(document.reference.model)}", ""]
    out += [f"**{md_text(headline(document))}**", ""]
    out += md_table(COLUMNS, [row(result) for result in document.rows]) + [""]
    out += [
        f"Paired on the same documents (doc_id, with equal document, prompt and target hashes). "
        f"\u0394 is variant minus reference in points with Newcombe's paired interval; McNemar is exact; "
        f"a verdict rests on the {document.max_accuracy_drop * 100:.1f}-point accuracy-drop limit. "
        "Same answer compares the highest log-likelihood choice (or the filtered generated text).",
        "",
        "## Verdicts",
        "",
    ]
    for result in document.rows:
        out.append(f"- **{result.verdict}**: {md_text(result.reason)}")
        if result.advice:
            out.append(f"  - {md_text(result.advice)}")
    out.append("")
    notes = not_compared(document)
    if notes:
        out += ["## Not compared", ""] + [f"- {md_text(note)}" for note in notes] + [""]
    out += ["## Runs", ""]
    out += md_table(
        ["Run", "Model", "Folder"],
        [
            ["reference (A)", document.reference.model, document.reference.folder],
            ["variant (B)", document.variant.model, document.variant.folder],
        ],
    )
    out += ["", f"_quantcheck {document.tool_version}, {document.created_at}; every number is in `{JSON_FILE}`._", ""]
    return "\n".join(out)


def write_comparison(document: LmEvalComparisonFile, out: Path) -> tuple[Path, Path]:
    """Write comparison.json and report.md into `out` (created if needed); return their paths."""
    if out.exists() and not out.is_dir():
        raise ResultsFolderError(f"--out {out} is a file: choose a folder")
    json_path, markdown_path = out / JSON_FILE, out / MARKDOWN_FILE
    write_json_atomic(json_path, document)
    write_text_atomic(markdown_path, render_markdown(document))
    return markdown_path, json_path
