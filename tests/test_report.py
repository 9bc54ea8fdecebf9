"""The report renders from the run folder alone: complete, partial and broken folders."""

from __future__ import annotations

import csv
import html
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape

from quantcheck.analysis import format as fmt
from quantcheck.analysis.verdict import decide, fail_level, quality_check_count
from quantcheck.errors import ResultsFolderError
from quantcheck.report import ReportFiles, render_report
from quantcheck.report.markdown import parse_md_table
from quantcheck.report.plots import FIGURES, model_colors, tradeoff_figure
from quantcheck.schema.results import (
    CostComparison,
    DivergenceSummary,
    ModelResult,
    Results,
    Thresholds,
    TokenAgreement,
)
from quantcheck.stats.intervals import heavy_tailed_mean, proportion
from quantcheck.stats.paired import compare_paired
from report_fixture import XSS_QUESTION_MARKER, build_partial_run_folder, build_run_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return build_run_folder(tmp_path / "run")


@pytest.fixture
def partial_dir(tmp_path: Path) -> Path:
    return build_partial_run_folder(tmp_path / "partial")


@pytest.fixture
def rendered(run_dir: Path) -> ReportFiles:
    return render_report(run_dir)


def _results(run_dir: Path) -> Results:
    return Results.model_validate_json((run_dir / "results.json").read_bytes())


def test_render_writes_every_file(run_dir: Path, rendered: ReportFiles) -> None:
    assert rendered.html == run_dir / "report.html" and rendered.html.is_file()
    assert rendered.markdown == run_dir / "report.md" and rendered.markdown.is_file()
    assert rendered.csv == run_dir / "metrics.csv" and rendered.csv.is_file()
    assert set(rendered.figures) == {"serve", "cost", "jaccard", "kl", "accuracy", "tradeoff"}
    assert rendered.missing_figures == {}
    for path in rendered.figures.values():
        assert path.parent == run_dir / "figures"
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert path.stat().st_size > 5_000
    # atomic writes leave no temporary files behind
    leftovers = [p.name for p in [*run_dir.iterdir(), *(run_dir / "figures").iterdir()] if p.name.endswith(".tmp")]
    assert leftovers == []


def test_html_is_self_contained(rendered: ReportFiles) -> None:
    page = rendered.html.read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert page.count('src="data:image/png;base64,') == len(rendered.figures)
    for needle in ('src="http', "src='http", 'href="http', "<link", "@import", "url(http"):
        assert needle not in page, needle
    assert page.count("<script") == 1  # only the report's own inline script


def test_untrusted_text_is_escaped(rendered: ReportFiles) -> None:
    page = rendered.html.read_text(encoding="utf-8")
    assert XSS_QUESTION_MARKER not in page
    assert html.escape(XSS_QUESTION_MARKER, quote=False) in page
    assert "<img src=x onerror" not in page  # a generated text
    assert "&amp;" in page  # the "&" of the question is escaped too


def test_markdown_verdict_table_matches_results(run_dir: Path, rendered: ReportFiles) -> None:
    results = _results(run_dir)
    md = rendered.markdown.read_text(encoding="utf-8")
    assert f"**Recommendation: {results.recommendation.reason}**" in md
    standings = {row[0]: row for row in parse_md_table(md, "Candidate")}
    assert set(standings) == {s.name for s in results.recommendation.standings}
    for s in results.recommendation.standings:
        assert standings[s.name][1] == (s.decision or "no verdict")
        assert standings[s.name][-1].startswith("on the front" if s.on_front else f"beaten by {s.beaten_by}") or (
            s.name == results.recommendation.serve and standings[s.name][-1].startswith("recommended")
        )
    rows = {row[0]: row for row in parse_md_table(md, "Variant")}
    variants = [m for m in results.models if m.name != "reference"]
    assert set(rows) == {m.name for m in variants}
    for m in variants:
        row = rows[m.name]
        cvr, pl, ag = m.cost_vs_reference, m.paired_loglik, m.agreement
        expected_decision = m.verdict.decision if m.verdict else None
        if expected_decision:
            assert row[1] == expected_decision
        assert row[2] == (fmt.memory_vs_ref(cvr.weight_memory_ratio, cvr.memory_saving) if cvr else fmt.NA)
        assert row[3] == (fmt.points_ci(pl.difference, pl.difference_ci) if pl else fmt.NA)
        assert row[4] == (fmt.pvalue(pl.mcnemar_p) if pl else fmt.NA)
        assert row[5] == (fmt.nats(ag.kl.mean.value) if ag else fmt.NA)
        assert row[6] == (fmt.percent(ag.top1_agreement.value) if ag else fmt.NA)
        j1 = ag.jaccard[1].value if ag and 1 in ag.jaccard else None
        j20 = ag.jaccard[20].value if ag and 20 in ag.jaccard else None
        assert row[7] == f"{fmt.fraction(j1)} / {fmt.fraction(j20)}"


def test_html_shows_the_same_numbers_as_markdown(rendered: ReportFiles) -> None:
    md = rendered.markdown.read_text(encoding="utf-8")
    page = rendered.html.read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", page)  # cells may be split into no-wrap spans
    for row in parse_md_table(md, "Variant"):
        for cell in row:
            assert str(escape(cell)) in text, cell  # escaped as jinja2 does
    for figure in rendered.figures.values():
        assert f"](figures/{figure.name})" in md


def test_formatting_helpers() -> None:
    assert fmt.percent(0.725) == "72.5%"
    assert fmt.points(-0.017) == "-1.7 pts"
    assert fmt.points(-0.0001) == "+0.0 pts"
    assert fmt.pvalue(0.0004) == "<0.001"
    assert fmt.nats(0.0) == "0"
    assert fmt.nbytes(3 * 1024**3) == "3.00 GiB"
    assert fmt.seconds(0.0123) == "12.3 ms"
    for f in (fmt.percent, fmt.points, fmt.pvalue, fmt.nats, fmt.fraction, fmt.ratio, fmt.nbytes, fmt.seconds):
        assert f(None) == fmt.NA


def test_metrics_csv_one_row_per_model(run_dir: Path, rendered: ReportFiles) -> None:
    results = _results(run_dir)
    with rendered.csv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == [m.name for m in results.models]
    by_name = {m.name: m for m in results.models}
    for row in rows:
        m = by_name[row["model"]]
        if m.loglik is not None:
            assert float(row["loglik_accuracy"]) == pytest.approx(m.loglik.accuracy)
        else:
            assert row["loglik_accuracy"] == ""
        if m.cost is not None:
            assert int(row["weight_bytes"]) == m.cost.weights.counted_bytes
        if m.paired_loglik is not None:
            assert float(row["mcnemar_p_loglik"]) == pytest.approx(m.paired_loglik.mcnemar_p)
    assert rows[0]["role"] == "reference"


def test_oom_and_failed_model_are_reported(rendered: ReportFiles) -> None:
    page = rendered.html.read_text(encoding="utf-8")
    assert "hqq-2bit failed" in page
    assert "QuantMethodError" in page
    md = rendered.markdown.read_text(encoding="utf-8")
    cost_rows = {row[0]: row for row in parse_md_table(md, "Model", with_column="OOM at batch")}
    assert cost_rows["nf4"][-1] == "8"  # OOM at batch 8
    assert cost_rows["reference"][-1] == "none"


def test_partial_folder_renders_and_says_what_is_missing(partial_dir: Path) -> None:
    results = _results(partial_dir)
    assert not (partial_dir / "items.jsonl").exists()
    files = render_report(partial_dir)
    page = files.html.read_text(encoding="utf-8")
    md = files.markdown.read_text(encoding="utf-8")
    assert "What is missing" in page and "What is missing" in md
    assert "not finished" in page
    assert "items.jsonl is missing" in page
    assert "dataset.jsonl is missing" in page
    for section in results.missing:
        assert f"Section not computed: {section}" in page
    # figures that cannot be drawn are named with the reason, the others still are drawn
    assert "cost" in files.figures
    assert {"kl", "jaccard", "accuracy", "tradeoff"} <= set(files.missing_figures)
    assert "Figure not drawn" in page
    assert "no variant passes yet (int8-wo, nf4, hqq-2bit have no verdict yet)" in md
    assert "no variant passes yet (int8-wo, nf4, hqq-2bit have no verdict yet)" in page
    assert not (partial_dir / "figures" / "kl.png").exists()


def test_only_results_json_with_nothing_else(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    (run / "results.json").write_text('{"tool_version": "0.1.0", "created_at": "2025-01-01T00:00:00Z"}')
    files = render_report(run)
    assert files.figures == {}
    page = files.html.read_text(encoding="utf-8")
    assert "No model results" in page
    assert "No figure could be drawn" in page


def test_rerender_removes_figures_that_no_longer_apply(run_dir: Path, rendered: ReportFiles) -> None:
    assert (run_dir / "figures" / "kl.png").exists()
    (run_dir / "items.jsonl").unlink()
    files = render_report(run_dir)
    assert "kl" not in files.figures
    assert not (run_dir / "figures" / "kl.png").exists()


def test_truncated_items_line_is_reported_not_fatal(run_dir: Path) -> None:
    with (run_dir / "items.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"item_id": "mmlu-x", "model": "int8-wo", "answ')  # a crash mid-write
    files = render_report(run_dir)
    page = files.html.read_text(encoding="utf-8")
    n_lines = len((run_dir / "items.jsonl").read_text().splitlines())
    assert f"items.jsonl line {n_lines} is not a valid item record" in page


def test_missing_results_json_raises_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ResultsFolderError) as info:
        render_report(tmp_path)
    message = str(info.value)
    assert message == f"{tmp_path} has no results.json: is it a quantcheck run folder?"
    assert "\n" not in message


def test_invalid_results_json_raises_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"tool_version": 3, "models": "nope"')
    with pytest.raises(ResultsFolderError) as info:
        render_report(tmp_path)
    assert "\n" not in str(info.value)
    assert "results.json" in str(info.value)


def test_rendering_does_not_import_torch(run_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from quantcheck.report import render_report
        render_report(Path({str(run_dir)!r}))
        heavy = sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
        """
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert (run_dir / "report.html").is_file()


# ------------------------------------------------------------------------------- trade-off chart


def kl_rejected_run() -> Results:
    """A variant within the memory and accuracy limits whose mean KL is far above its limit,
    measured and judged as summarize does (2000 items, no answer flips, KL around 0.3 nats)."""
    n = 2000
    level = fail_level(quality_check_count(loglik=True, generative=False, agreement=True))
    correct = [True] * 1200 + [False] * 800
    answers = ["A" if ok else "B" for ok in correct]
    kl = np.random.default_rng(0).lognormal(np.log(0.2), 1.0, n)
    variant = ModelResult(
        name="bnb-nf4-dq",
        description="bitsandbytes NF4 with double quantization",
        status="ok",
        paired_loglik=compare_paired(correct, correct, answers, answers, fail_level=level),
        agreement=TokenAgreement(
            n=n,
            jaccard={},
            top1_agreement=proportion([True] * 1960 + [False] * 40, fail_level=level),
            kl=DivergenceSummary(
                mean=heavy_tailed_mean(kl, seed=0, fail_level=level),
                median=float(np.median(kl)),
                p90=float(np.quantile(kl, 0.9)),
                max=float(kl.max()),
            ),
        ),
        cost_vs_reference=CostComparison(weight_memory_ratio=0.3, memory_saving=0.7, latency_ratio={1: 1.2}),
    )
    variant.verdict = decide(variant, Thresholds())
    reference = ModelResult(name="reference", description="the reference", status="ok")
    return Results(tool_version="0.1.0", created_at="2025-01-01T00:00:00Z", models=[reference, variant])


def test_tradeoff_chart_shows_a_kl_rejected_variant_as_rejected() -> None:
    """Inside the shaded memory-and-accuracy corner, yet rejected for its KL: the chart says so."""
    results = kl_rejected_run()
    verdict = results.models[1].verdict
    assert verdict.decision == "DON'T QUANTIZE"
    assert verdict.checks == {
        "memory": "pass",
        "log-likelihood accuracy": "pass",
        "mean KL": "fail",
        "top-1 agreement": "pass",
    }
    fig = tradeoff_figure(results, model_colors(results))
    ax = fig.axes[0]
    texts = [text.get_text() for text in ax.texts]
    assert "bnb-nf4-dq: DON'T QUANTIZE\nfail: mean KL" in texts
    assert not any("meets" in text for text in texts)
    assert "memory and accuracy limits only; the marker shows the verdict" in texts
    point = next(line for line in ax.get_lines() if line.get_gid() == "bnb-nf4-dq" and line.get_marker() != "_")
    assert point.get_marker() == "X"
    x, y = point.get_xydata()[0]
    assert x > results.thresholds.min_memory_saving * 100 and y < results.thresholds.max_accuracy_drop * 100
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["DON'T QUANTIZE"]
    caption = next(spec.caption for spec in FIGURES if spec.key == "tradeoff")
    assert "also weighs mean KL" in caption and "meets the memory and quality thresholds" not in caption


def test_report_states_the_familywise_level(run_dir: Path, rendered: ReportFiles) -> None:
    md = rendered.markdown.read_text(encoding="utf-8")
    page = rendered.html.read_text(encoding="utf-8")
    sentence = (
        "fails it only when its interval at 1 \u2212 0.05/m "
        "(Bonferroni over its m quality checks: 98.33%, 98.75% here) "
        "lies beyond it, so the intervals that can reject a variant hold together with at least 95% confidence "
        "(family-wise)."
    )
    assert sentence in md
    assert str(escape(sentence)) in page
