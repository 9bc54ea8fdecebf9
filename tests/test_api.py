"""`quantcheck.compare()` runs what `quantcheck run` runs; a run's config.toml runs it again; `load()` needs no torch.

Three real runs of the built-in model against bnb-nf4 on 4 questions (no cost, no floors, 4 new
tokens): the README's notebook example, the same run typed partly on the command line and partly
in a config file, and that run again from its own RUN_DIR/config.toml in another folder.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import quantcheck
import quantcheck.api
from conftest import quantcheck as quantcheck_cli
from conftest import read_items, read_results

README = Path(__file__).resolve().parents[1] / "README.md"
# What differs between two runs of the same settings: when, how fast, and where.
VOLATILE = {"created_at", "words_per_minute", "tokens_per_second", "seconds", "out"}


def stable(value: object) -> object:
    if isinstance(value, dict):
        return {key: stable(item) for key, item in value.items() if key not in VOLATILE}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


def settings_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "config.toml").read_text().splitlines() if not line.startswith("out = ")]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory) -> Path:
    """The README's notebook example as a notebook runs it: a fresh Python in a fresh folder."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    root = tmp_path_factory.mktemp("notebook")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{'bnb-nf4': VerdictSummary(decision=" in result.stdout  # print(c.verdicts)
    return root / "runs" / "notebook"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """The same run from the command line: typed options override the file's limit and max_new_tokens."""
    root = tmp_path_factory.mktemp("cli")
    (root / "run.toml").write_text(
        'variants = ["bnb-nf4"]\nlimit = 50\nskip_cost = true\nfloors = false\n\n[generation]\nmax_new_tokens = 16\n'
    )
    result = quantcheck_cli(
        "run", "--config", str(root / "run.toml"), "--limit", "4", "--max-new-tokens", "4", "--out", str(root / "run")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {root / 'run' / 'report.html'}" in result.stdout
    return root / "run"


@pytest.fixture(scope="module")
def replayed_run(cli_run, tmp_path_factory) -> Path:
    """`quantcheck run --config RUN_DIR/config.toml` into another folder, from another working folder."""
    root = tmp_path_factory.mktemp("replay")
    result = quantcheck_cli("run", "--config", str(cli_run / "config.toml"), "--out", "again", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "again"


def test_the_api_and_the_cli_write_the_same_results(notebook_run, cli_run):
    api, cli = read_results(notebook_run), read_results(cli_run)
    assert [m["name"] for m in cli["models"]] == ["reference", "bnb-nf4"]
    assert (
        cli["dataset"]["n_items"] == 4 and cli["config"]["generation"]["max_new_tokens"] == 4
    )  # typed over the file's 50 and 16
    assert cli["models"][1]["agreement"]["kl"]["mean"]["value"] > 0  # a real 4-bit variant, really scored
    assert stable(api) == stable(cli)
    assert stable(read_items(notebook_run)) == stable(read_items(cli_run))
    assert settings_lines(notebook_run) == settings_lines(cli_run)


def test_a_runs_config_toml_runs_it_again(cli_run, replayed_run):
    first, again = read_results(cli_run), read_results(replayed_run)
    assert [(m["name"], m["verdict"]) for m in again["models"]] == [(m["name"], m["verdict"]) for m in first["models"]]
    answers = lambda run: [
        (i["item_id"], i["model"], i["loglik"]["pred"], i["generative"]["text"]) for i in read_items(run)
    ]  # noqa: E731
    assert answers(replayed_run) == answers(cli_run)
    assert stable(again) == stable(first)
    assert settings_lines(replayed_run) == settings_lines(cli_run)
    assert f'out = "{replayed_run.resolve()}"' in (replayed_run / "config.toml").read_text()


def test_the_tables_hold_the_numbers_of_results_json(notebook_run):
    c = quantcheck.load(notebook_run)
    variant = c.results.models[1]
    assert c.verdicts == {"bnb-nf4": (variant.verdict.decision, variant.verdict.summary)}
    assert list(c.models.index) == ["reference", "bnb-nf4"]
    assert c.models.loc["bnb-nf4", "mean_kl"] == variant.agreement.kl.mean.value
    assert c.models.loc["bnb-nf4", "top1_agreement"] == variant.agreement.top1_agreement.value
    assert c.models.loc["reference", "loglik_accuracy"] == c.results.models[0].loglik.accuracy
    items = c.items
    assert len(items) == 8 and set(items["subject"]) == {"virology"}
    for model in c.results.models:  # per-item correctness adds up to each model's accuracy
        mine = items[items["model"] == model.name]
        assert mine["loglik_correct"].mean() == model.loglik.accuracy
        assert mine["generated_correct"].mean() == model.generative.accuracy.accuracy
    assert items[items["model"] == "bnb-nf4"]["kl"].mean() == pytest.approx(variant.agreement.kl.mean.value)
    assert c.latency.empty and "median_s" in c.latency.columns  # no cost sweep in this run
    assert c.report_html == notebook_run / "report.html" and c.report_md.is_file()
    html = c._repr_html_()
    assert "<table>" in html and variant.verdict.decision.replace("'", "&#x27;") in html and "report.html" in html
    assert len(html) < 3000  # a summary and a link, not the report


def test_load_reads_a_run_without_torch(notebook_run):
    code = (
        "import sys, quantcheck\n"
        f"c = quantcheck.load({str(notebook_run)!r})\n"
        "rows = [len(c.models), len(c.items), len(c.latency), len(c._repr_html_()) > 0]\n"
        "print(rows, [name for name in ('torch', 'transformers') if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[2, 8, 0, True] []", result.stdout


def test_the_module_docstring_example_runs(notebook_run):
    outcome = doctest.testmod(quantcheck.api, extraglobs={"run_dir": notebook_run}, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted >= 5 and outcome.failed == 0


def test_the_latency_table_is_the_cost_sweep(small_run):
    c = quantcheck.load(small_run)
    latency = c.latency
    for model in c.results.models:
        rows = latency[latency["model"] == model.name]
        assert list(rows["batch_size"]) == [point.batch_size for point in model.cost.latency] == [1, 2]
        assert list(rows["median_s"]) == [point.median_s for point in model.cost.latency]
        ratios = model.cost_vs_reference.latency_ratio if model.cost_vs_reference else {}
        assert [None if r != r else r for r in rows["latency_ratio"]] == [ratios.get(size) for size in (1, 2)]
