"""quantcheck from Python: `compare()` runs what `quantcheck run` runs, `load()` reads a run folder back.

    import quantcheck

    c = quantcheck.compare(variants=["bnb-nf4"], limit=200, skip_cost=True)  # minutes, like the CLI
    c.verdicts      # {'bnb-nf4': VerdictSummary(decision=..., summary=...)}
    c.models        # pandas: one row per model, metrics.csv's columns
    c.items         # one row per question and model (items.jsonl)
    c.latency       # one row per model and batch size
    c.report_html   # RUN_DIR/report.html; in Jupyter `c` alone shows the verdict table

`compare()` and the command line share one path (`run_config`): the same worker processes, run
folder, resume and report. Reading a finished run imports neither torch nor a model, so a
notebook can explore runs made elsewhere (`run_dir` is a finished run of bnb-nf4 on 4 questions):

>>> import quantcheck
>>> c = quantcheck.load(run_dir)
>>> list(c.verdicts)
['bnb-nf4']
>>> c.models.loc["bnb-nf4", "role"]
'variant'
>>> c.items.groupby("model").size().to_dict()
{'bnb-nf4': 4, 'reference': 4}
>>> c.report_html.name
'report.html'
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import cached_property
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from quantcheck.backends import DEFAULT_BACKEND
from quantcheck.config import CONFIG_FILE, RunConfig, key_path, parse_config, resolved_toml
from quantcheck.data.load import DEFAULT_DATASET
from quantcheck.report import HTML_FILE, MARKDOWN_FILE
from quantcheck.report.data import DATASET_FILE, ITEMS_FILE, load_dataset, load_items, load_results
from quantcheck.schema.results import LatencyPoint, Recommendation, Results

if TYPE_CHECKING:
    import pandas

__all__ = ["Comparison", "VerdictSummary", "compare", "load", "run_config"]

PER_ROUND_FIELDS = {"round_medians_s", "round_disturbed", "times_s", "round_times_s"}
LATENCY_COLUMNS = [
    "model",
    *(name for name in LatencyPoint.model_fields if name not in PER_ROUND_FIELDS),
    "latency_ratio",
    "latency_ratio_ci_low",
    "latency_ratio_ci_high",
    "unstable",
]


class VerdictSummary(NamedTuple):
    decision: str
    summary: str


def _ratio_ci(against: object, batch_size: int) -> dict[str, float | None]:
    """The latency ratio's interval at one batch size, as two columns."""
    ci = against.latency_ratio_ci.get(batch_size) if against is not None else None
    return {"latency_ratio_ci_low": ci.low if ci else None, "latency_ratio_ci_high": ci.high if ci else None}


class Comparison:
    """One run folder: `results` (results.json as pydantic objects), its tables, the report's paths."""

    def __init__(self, run_dir: Path, results: Results) -> None:
        self.run_dir = Path(run_dir)
        self.results = results

    @property
    def verdicts(self) -> dict[str, VerdictSummary]:
        """Variant name -> decision and its one-sentence reason (`results.models[i].verdict` has the rest)."""
        return {m.name: VerdictSummary(m.verdict.decision, m.verdict.summary) for m in self.results.models if m.verdict}

    @property
    def recommendation(self) -> Recommendation:
        """Which variant to serve, across the run (a results.json from before schema 7 gets one made now)."""
        from quantcheck.report.table import recommendation

        return recommendation(self.results)

    @cached_property
    def models(self) -> pandas.DataFrame:
        """One row per model, indexed by name: metrics.csv's columns, raw numbers (NaN: not measured)."""
        import pandas

        from quantcheck.report.data import reference_model
        from quantcheck.report.table import CSV_COLUMNS, metrics_row

        reference = reference_model(self.results)
        rows = [metrics_row(m, reference) for m in self.results.models]
        return pandas.DataFrame(rows, columns=CSV_COLUMNS).set_index("model")

    @cached_property
    def items(self) -> pandas.DataFrame:
        """One row per question and model, from items.jsonl (top-k ids left out), with the subject. With the compact
        reference store kl is an estimate: kl_se is its standard error, kl_lower and kl_upper its certain bounds."""
        import pandas

        from quantcheck.schema.results import TOP_K

        problems: list[str] = []
        records = load_items(self.run_dir / ITEMS_FILE, problems) if (self.run_dir / ITEMS_FILE).is_file() else []
        questions = (
            load_dataset(self.run_dir / DATASET_FILE, problems) if (self.run_dir / DATASET_FILE).is_file() else {}
        )
        for problem in problems:  # a run killed mid-write leaves a torn last line: say so, keep the rest
            warnings.warn(problem, stacklevel=2)
        rows = []
        for record in records:
            loglik, generated, question = record.loglik, record.generative, questions.get(record.item_id)
            rows.append(
                {
                    "item_id": record.item_id,
                    "model": record.model,
                    "subject": question.subject if question else None,
                    "answer": record.answer,
                    "loglik_pred": loglik.pred if loglik else None,
                    "loglik_correct": loglik.correct if loglik else None,
                    "kl": record.kl,
                    "kl_se": record.kl_se,
                    "kl_lower": record.kl_lower,
                    "kl_upper": record.kl_upper,
                    "top1_agree": record.top1_agree,
                    **{f"jaccard_{k}": (record.jaccard or {}).get(k) for k in TOP_K},
                    "generated_text": generated.text if generated else None,
                    "generated_pred": generated.pred if generated else None,
                    "generated_correct": generated.correct if generated else None,
                    "generated_tokens": generated.new_tokens if generated else None,
                }
            )
        columns = [
            "item_id",
            "model",
            "subject",
            "answer",
            "loglik_pred",
            "loglik_correct",
            "kl",
            "kl_se",
            "kl_lower",
            "kl_upper",
            "top1_agree",
            *(f"jaccard_{k}" for k in TOP_K),
            "generated_text",
            "generated_pred",
            "generated_correct",
            "generated_tokens",
        ]
        return pandas.DataFrame(rows, columns=columns)

    @cached_property
    def latency(self) -> pandas.DataFrame:
        """One row per model and batch size of the cost sweep, with the ratio to the reference's latency."""
        import pandas

        rows = []
        for m in self.results.models:
            against = m.cost_vs_reference
            for point in m.cost.latency if m.cost else []:
                rows.append(
                    {
                        "model": m.name,
                        **point.model_dump(exclude=PER_ROUND_FIELDS),
                        "latency_ratio": against.latency_ratio.get(point.batch_size) if against else None,
                        **_ratio_ci(against, point.batch_size),
                        "unstable": point.batch_size in against.unstable_batch_sizes if against else None,
                    }
                )
        return pandas.DataFrame(rows, columns=LATENCY_COLUMNS)

    @property
    def report_html(self) -> Path | None:
        return self._file(HTML_FILE)

    @property
    def report_md(self) -> Path | None:
        return self._file(MARKDOWN_FILE)

    def _file(self, name: str) -> Path | None:
        path = self.run_dir / name
        return path if path.is_file() else None

    def _repr_html_(self) -> str:
        """Jupyter: the headline and the verdict table, and a link to the full report (not the report itself)."""
        from quantcheck.report.table import VERDICT_COLUMNS, headline, verdict_rows

        head = "".join(f"<th>{escape(column)}</th>" for column in VERDICT_COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row.cells()) + "</tr>"
            for row in verdict_rows(self.results)
        )
        report = self.report_html
        link = (
            f'<a href="{escape(Path(os.path.relpath(report)).as_posix())}" target="_blank">{escape(str(report))}</a>'
            if report
            else f"not rendered yet: quantcheck report {escape(str(self.run_dir))}"
        )
        return (
            f"<p><b>{escape(headline(self.results))}</b></p><table><tr>{head}</tr>{body}</table><p>report: {link}</p>"
        )

    def __repr__(self) -> str:
        decisions = ", ".join(f"{name}: {verdict.decision}" for name, verdict in self.verdicts.items())
        return f"Comparison({str(self.run_dir)!r}; {decisions or 'no verdicts'})"


def compare(
    model: str | os.PathLike | None = None,
    variants: Sequence[str] = (),
    dataset: str | os.PathLike = DEFAULT_DATASET,
    backend: str = DEFAULT_BACKEND,
    out: str | os.PathLike | None = None,
    **options: object,
) -> Comparison:
    """Compare `model` (default: the built-in smollm2-135m) with each of `variants`, as `quantcheck run` does.

    `options` are the other keys of a config file (see `quantcheck.config`), for instance
    `limit=200, skip_cost=True, generation={"max_new_tokens": 8}, thresholds={"max_kl": 0.1}, quiet=True`.
    The same `out` resumes a run. Bad input raises `QuantcheckError` with one line naming the key.
    """
    settings = {"model": model, "variants": variants, "dataset": dataset, "backend": backend, "out": out, **options}
    return run_config(parse_config(settings, key_path))


def run_config(config: RunConfig) -> Comparison:
    """Run (or resume) `config`, then write RUN_DIR/config.toml and the report: all of `quantcheck run` but the
    terminal."""
    from quantcheck.orchestration.runner import run
    from quantcheck.report import render_report
    from quantcheck.storage.store import write_text_atomic

    folder, results = run(config.options())
    write_text_atomic(folder / CONFIG_FILE, resolved_toml(config, results.config))
    render_report(folder)
    return Comparison(folder, results)


def load(run_dir: str | os.PathLike) -> Comparison:
    """A run folder read back (results.json must exist; a partial run loads too), without torch."""
    return Comparison(Path(run_dir), load_results(Path(run_dir)))


if TYPE_CHECKING:
    from quantcheck.schema.sensitivity import SensitivityTable


def sensitivity(
    model: str | os.PathLike | None = None,
    quant: str = "bnb-nf4",
    dataset: str | os.PathLike = DEFAULT_DATASET,
    out: str | os.PathLike | None = None,
    **options: object,
) -> SensitivityTable:
    """Which decoder layers `quant` hurts, and a mixed-precision variant proposed from that and measured, as `quantcheck
    sensitivity` does: `table.layers` ranked (highest mean KL first), `table.proposals` with predicted and measured KL.

    `options` are the command's other options by name (`limit`, `keep`, `max_kl`, `skip_cost`, `skip_generation`,
    `batch_size`, `device`, `quiet`, ...). The run folder (`table.run_dir`) holds sensitivity.json beside the measured
    variants' results.json and report. Bad input raises `QuantcheckError` with one line naming the key.
    """
    from pydantic import ValidationError

    from quantcheck.errors import QuantcheckError
    from quantcheck.orchestration.sensitivity import SensitivityOptions, run_sensitivity
    from quantcheck.report import render_report

    paths = {"model": model, "dataset": dataset, "out": out}
    settings = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in paths.items()}
    try:
        parsed = SensitivityOptions.model_validate({**settings, "quant": quant, **options})
    except ValidationError as error:
        problem = error.errors()[0]
        message = "unknown option" if problem["type"] == "extra_forbidden" else problem["msg"]
        raise QuantcheckError(f"{key_path(tuple(problem['loc']))}: {message}") from None
    table = run_sensitivity(parsed)
    render_report(Path(table.run_dir))
    return table
