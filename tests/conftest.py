"""Shared fixtures: one real run of the pipeline on the built-in model, reused by many tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from quantcheck.data.load import load_dataset

XSS_QUESTION = "Which of these is <script>alert(1)</script> & friends?"
SMALL_COST = ["--batch-sizes", "1,2", "--seq-len", "16", "--time-budget", "0.5", "--iterations", "3"]


def quantcheck(*args: str, env: dict[str, str] | None = None, timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "quantcheck.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kwargs,
    )


def write_questions(path: Path, count: int, xss_at: int | None = None) -> Path:
    """The first `count` MMLU virology questions as JSONL (one made hostile, for the report's escaping)."""
    lines = []
    for index, item in enumerate(load_dataset("mmlu:virology").items[:count]):
        question = XSS_QUESTION if index == xss_at else item.question
        lines.append(json.dumps({"id": item.item_id, "subject": item.subject, "question": question,
                                 "choices": list(item.choices), "answer": item.answer_letter}))
    path.write_text("\n".join(lines) + "\n")
    return path


def lowercase_tokenizer_copy(folder: Path) -> Path:
    """The built-in model's weights (linked) with a tokenizer that lower-cases every prompt: another tokenizer, same model."""
    from quantcheck.models.builtin import builtin_model_dir

    folder.mkdir()
    for path in builtin_model_dir().iterdir():
        (folder / path.name).symlink_to(path) if path.suffix == ".safetensors" else shutil.copy(path, folder / path.name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked slow first: under xdist (`make test`) the longest modules start early instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(folder)` once per test session, across xdist's workers too: the first to ask builds, the others wait and reuse."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def _build_small_run(root: Path) -> None:
    questions = write_questions(root / "questions.jsonl", 8, xss_at=2)
    result = quantcheck("run", "--quant", "none", "--quant", "bnb-nf4", "--dataset", str(questions), "--out", str(root / "run"),
                        "--batch-size", "3", "--max-new-tokens", "8", "--gen-batch-size", "4", "--cost-rounds", "1", *SMALL_COST)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run: the built-in model vs `none` and `bnb-nf4`, 8 questions, every phase measured (one cost round:
    the alternating rounds have their own test, `test_cost_drift`)."""
    return built_once(tmp_path_factory, "small-run", _build_small_run) / "run"


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def read_items(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
