"""Render a run folder into a report: report.html, report.md, metrics.csv and figures/*.png.

Reads only the files of the run folder (results.json, items.jsonl, dataset.jsonl, a text corpus's
models/*/corpus.jsonl) with the shared pydantic schema; never imports torch or transformers, so it
renders in about a second and works on a machine without the model. Partial runs render too: the report says what is
missing.

    from quantcheck.report import render_report
    files = render_report(Path("runs/my-run"))
    print(files.html)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantcheck.errors import ResultsFolderError

__all__ = ["ReportFiles", "render_report", "HTML_FILE", "MARKDOWN_FILE", "CSV_FILE"]

HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"
CSV_FILE = "metrics.csv"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    """What `render_report` wrote. `figures` maps a figure key to its PNG; `missing_figures` maps
    the key of each figure that could not be drawn to the reason."""

    run_dir: Path
    html: Path
    markdown: Path
    csv: Path
    figures: dict[str, Path] = field(default_factory=dict)
    missing_figures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def render_report(run_dir: Path) -> ReportFiles:
    """Render every report file into `run_dir` (atomically) and return their paths.

    Raises `ResultsFolderError` when `run_dir/results.json` is missing or invalid, or when the
    folder cannot be written.
    """
    # Imported here so `import quantcheck.report` stays cheap (matplotlib loads only to render).
    from quantcheck.report import plots
    from quantcheck.report.data import load_run
    from quantcheck.report.html import render_html
    from quantcheck.report.markdown import render_markdown
    from quantcheck.report.table import metrics_csv
    from quantcheck.storage.store import write_text_atomic

    start = time.perf_counter()
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    colors = plots.model_colors(data.results, data.items)
    fig_dir = run_dir / plots.FIGURES_DIR

    try:
        fig_dir.mkdir(exist_ok=True)
        figures: dict[str, Path] = {}
        missing: dict[str, str] = {}
        for spec in plots.FIGURES:
            path = None
            if data.kinds & set(spec.kinds):  # another kind of run's figure is neither drawn nor reported missing
                try:
                    path = plots.draw(spec, data, fig_dir, colors)
                except OSError:
                    raise
                except Exception as exc:  # a figure must not take the whole report down with it
                    log.warning("figure %s could not be drawn", spec.key, exc_info=True)
                    missing[spec.key] = f"could not be drawn ({type(exc).__name__}: {exc})"
                if path is None:
                    missing.setdefault(spec.key, spec.needs)
            if path is None:
                stale = fig_dir / spec.filename
                if stale.exists():  # a figure from an earlier render would contradict this one
                    stale.unlink()
            else:
                figures[spec.key] = path

        titles = {s.key: s.title for s in plots.FIGURES}
        skipped = {titles[k]: reason for k, reason in missing.items()}
        md = render_markdown(data, {k: p.name for k, p in figures.items()}, plots.FIGURES, skipped)
        html = render_html(data, figures, plots.FIGURES, skipped, colors)
        csv_text = metrics_csv(data.results)

        html_path = write_text_atomic(run_dir / HTML_FILE, html)
        md_path = write_text_atomic(run_dir / MARKDOWN_FILE, md)
        csv_path = write_text_atomic(run_dir / CSV_FILE, csv_text)
    except OSError as exc:
        raise ResultsFolderError(f"cannot write the report into {run_dir}: {exc.strerror or exc}") from None

    return ReportFiles(
        run_dir=run_dir,
        html=html_path,
        markdown=md_path,
        csv=csv_path,
        figures=figures,
        missing_figures=missing,
        seconds=time.perf_counter() - start,
    )
