"""The report of real token-level runs (a text's windows, users' prompts): llama-perplexity's table, the KL-per-token
figure, where the variants depart most, no question-centric parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import quantcheck
from quantcheck.analysis import format as fmt
from quantcheck.cli import _print_summary
from quantcheck.report import render_report
from quantcheck.report.markdown import parse_md_table
from quantcheck.report.table import CORPUS_ROWS
from quantcheck.schema.results import Results

CONTEXT = 64
WINDOWS = 4
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run through the CLI: the identity variant (none) and bf16 on four windows of the built-in text."""
    out = tmp_path_factory.mktemp("corpus") / "run"
    proc = quantcheck(
        "run",
        "--dataset",
        "text:builtin",
        "--limit",
        str(WINDOWS),
        "--context",
        str(CONTEXT),
        "--quant",
        "none",
        "--quant",
        "bf16",
        "--skip-cost",
        "--out",
        str(out),
        "--force",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def results(run_dir: Path) -> Results:
    return Results.model_validate_json((run_dir / "results.json").read_bytes())


@pytest.fixture(scope="module")
def corpus_table(run_dir: Path) -> dict[str, dict[str, str]]:
    """report.md's corpus table as {statistic: {column: cell}}."""
    text = (run_dir / "report.md").read_text(encoding="utf-8")
    header = next(line for line in text.splitlines() if line.startswith("| Statistic |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = parse_md_table(text, "Statistic")
    return {row[0]: dict(zip(columns, row)) for row in rows}


def test_corpus_table_has_llama_perplexity_rows_in_order(
    corpus_table: dict[str, dict[str, str]], results: Results
) -> None:
    assert list(corpus_table) == [label for label, _, _ in CORPUS_ROWS]
    assert results.dataset is not None and results.dataset.kind == "text" and results.dataset.n_items == WINDOWS


def test_engine_floors_on_a_text(results: Results) -> None:
    """Defect 3 of #24: the numeric floor is measured for text runs too, on a bounded subset of windows (all 4 here,
    together against one at a time): transformers fp32 moves almost nothing, bf16 more."""
    floors = {model.name: model.engine_floor for model in results.models}
    assert all(floor is not None and floor.n == WINDOWS for floor in floors.values())
    assert results.floors.numeric == floors["reference"] and floors["reference"].kl_mean < 1e-6
    assert floors["bf16"].kl_mean >= floors["reference"].kl_mean


def test_identity_variant_reads_zero_kl_and_ratio_one(corpus_table: dict[str, dict[str, str]]) -> None:
    none = {label: row["none"] for label, row in corpus_table.items()}
    assert none["Mean KLD"].split()[0] == "0"
    assert none["Mean PPL(Q)/PPL(base)"].split()[0] == "1.000"
    assert none["Same top p"].split()[0] == "100.0%"
    assert none["Mean PPL(Q)"] == none["Mean PPL(base)"]


def test_bf16_cells_are_the_results_formatted(corpus_table: dict[str, dict[str, str]], results: Results) -> None:
    bf16 = next(m for m in results.models if m.name == "bf16").corpus
    assert bf16 is not None and bf16.tokens == WINDOWS * (CONTEXT - 1 - CONTEXT // 2)
    mean = bf16.kl["mean"]
    assert mean.value > 0
    assert corpus_table["Mean KLD"]["bf16"] == fmt.nats_ci(mean.value, mean.ci)
    rms = bf16.delta_p["rms"]
    assert corpus_table["RMS \u0394p"]["bf16"] == fmt.percent_ci(rms.value, rms.ci, digits=3)
    published = next(column for column in corpus_table["Mean KLD"] if "published" in column)
    assert corpus_table["Mean KLD"][published] == "0.0014 / 0.0313"
    assert corpus_table["Same top p"][published].endswith("91.9%")


def test_section_header_names_windows_context_and_tokens(run_dir: Path, results: Results) -> None:
    tokens = results.models[0].corpus.tokens
    heading = (
        f"Text corpus: {WINDOWS} windows of {CONTEXT} tokens, the second half of each scored: {tokens} scored tokens"
    )
    assert f"## {heading}" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert heading in (run_dir / "report.html").read_text(encoding="utf-8")


def test_kl_per_token_figure_is_drawn_and_embedded(run_dir: Path) -> None:
    figure = run_dir / "figures" / "corpus_kl.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "](figures/corpus_kl.png)" in (run_dir / "report.md").read_text(encoding="utf-8")
    assert 'id="fig-corpus_kl"' in (run_dir / "report.html").read_text(encoding="utf-8")


def test_no_question_centric_parts(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert 'id="item-table"' not in page and 'id="items"' not in page
    for text in (page, markdown):
        assert "Accuracy and flips" not in text
        assert "items.jsonl" not in text and "dataset.jsonl is missing" not in text
        assert "Accuracy and generation speed" not in text and "KL divergence per item" not in text
    verdict_header = next(line for line in markdown.splitlines() if line.startswith("| Variant | Decision |"))
    assert "accuracy" not in verdict_header and "McNemar" not in verdict_header
    assert not (run_dir / "figures" / "accuracy.png").exists()


def test_terminal_summary_shows_perplexity(results: Results, capsys: pytest.CaptureFixture[str]) -> None:
    _print_summary(results, quiet=False)
    printed = capsys.readouterr().out
    assert "PPL ratio (95% CI)" in printed and "acc (loglik)" not in printed
    ratio = next(m for m in results.models if m.name == "none").corpus.perplexity_ratio
    assert fmt.number_ci(ratio.value, ratio.ci) in printed


def test_torn_or_missing_corpus_records(run_dir: Path, tmp_path: Path) -> None:
    """A run killed mid-write: the torn line is named and the figure still drawn; no records: the figure is missed."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    with (copy / "models" / "bf16" / "corpus.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"window": 9, "model": "bf16", "nll": [0.1, ')
    files = render_report(copy)
    assert "corpus_kl" in files.figures
    assert "models/bf16/corpus.jsonl line 5 is not a valid window record" in files.markdown.read_text(encoding="utf-8")
    for path in (copy / "models").glob("*/corpus.jsonl"):
        path.unlink()
    files = render_report(copy)
    assert "corpus_kl" in files.missing_figures and not (copy / "figures" / "corpus_kl.png").exists()
    assert "KL divergence per scored token: needs per-token kl values" in files.markdown.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ prompts run


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real prompts run through the CLI: three chats, one of them hostile in its id and its text."""
    folder = tmp_path_factory.mktemp("prompts")
    chats = [
        {
            "id": "capital",
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        },
        {"id": HOSTILE, "messages": [{"role": "user", "content": f"Repeat this exactly: {HOSTILE}"}]},
        [{"role": "user", "content": "List three primary colors."}],
    ]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats), encoding="utf-8")
    out = folder / "run"
    proc = quantcheck(
        "run",
        "--dataset",
        f"prompts:{folder / 'prompts.jsonl'}",
        "--quant",
        "none",
        "--quant",
        "bf16",
        "--skip-cost",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
        "--force",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def prompts_results(prompts_dir: Path) -> Results:
    return Results.model_validate_json((prompts_dir / "results.json").read_bytes())


def test_prompts_heading_and_dataset_row_say_prompts(prompts_dir: Path, prompts_results: Results) -> None:
    tokens = prompts_results.models[0].corpus.tokens
    heading = f"Your prompts: 3 prompts, the reference's greedy answers scored: {tokens} scored tokens"
    markdown = (prompts_dir / "report.md").read_text(encoding="utf-8")
    assert f"## {heading}" in markdown
    assert heading.replace("'", "&#39;") in (prompts_dir / "report.html").read_text(encoding="utf-8")
    assert "resample whole prompts" in markdown and "windows" not in markdown
    dataset = dict((row[0], row[1]) for row in parse_md_table(markdown, "Setting"))["Dataset"]
    assert "3 prompts from file" in dataset


def test_identity_variant_reads_zero_kl_on_prompts(prompts_dir: Path) -> None:
    rows = {row[0]: row for row in parse_md_table((prompts_dir / "report.md").read_text(encoding="utf-8"), "Statistic")}
    assert rows["Mean KLD"][1].split()[0] == "0"


def test_worst_spans_list_bf16s_worst_prompt(prompts_dir: Path, prompts_results: Results) -> None:
    worst = next(m for m in prompts_results.models if m.name == "bf16").corpus.worst[0]
    rows = parse_md_table((prompts_dir / "report.md").read_text(encoding="utf-8"), "Variant", with_column="Prompt")
    name = worst.name.replace("<", "&lt;")  # Markdown cells defuse tags
    # the compact store (the default): the value is an estimate, shown with its standard error (issue #24, defect 7)
    assert rows[0][:4] == [
        "bf16",
        name,
        str(worst.tokens),
        f"{fmt.nats(worst.mean_kl)} \u00b1 {fmt.nats(worst.mean_kl_se)}",
    ]
    assert "**" in rows[0][-1]
    assert all(row[0] != "none" for row in rows)  # KL 0 everywhere: nothing to show


def test_hostile_prompt_stays_escaped(prompts_dir: Path, prompts_results: Results, tmp_path: Path) -> None:
    """The hostile id as the run wrote it, then an answer that echoes it around the marked token."""
    page = (prompts_dir / "report.html").read_text(encoding="utf-8")
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in (prompts_dir / "report.md").read_text(encoding="utf-8")
    copy = shutil.copytree(prompts_dir, tmp_path / "run")
    echoed = prompts_results.model_copy(deep=True)
    span = next(m for m in echoed.models if m.name == "bf16").corpus.worst[0]
    span.before, span.token, span.after = f"Sure:\n\n{HOSTILE} ", " *bold*", "  and\tmore"
    (copy / "results.json").write_text(echoed.model_dump_json(), encoding="utf-8")
    files = render_report(copy)
    page = files.html.read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "Sure:\u23ce\u23ce&lt;script&gt;alert(1)&lt;/script&gt; <mark>*bold*</mark> and more" in page
    snippet = parse_md_table(files.markdown.read_text(encoding="utf-8"), "Variant", with_column="Prompt")[0][-1]
    assert snippet == "Sure:\u23ce\u23ce&lt;script>alert(1)&lt;/script> **\\*bold\\*** and more"
