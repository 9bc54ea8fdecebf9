"""Shared fixtures: one real run of the pipeline on the built-in model, reused by many tests."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# OpenMP threads sleep at barriers in this process and what it starts (a vLLM server), as quantcheck's workers do:
# spinning threads on two shared cores run 5-25x slower beside another busy process (see worker_environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quantcheck.data.load import load_dataset  # noqa: E402

XSS_QUESTION = "Which of these is <script>alert(1)</script> & friends?"
SMALL_COST = ["--batch-sizes", "1,2", "--seq-len", "16", "--time-budget", "0.5", "--iterations", "3"]


def quantcheck(
    *args: str, env: dict[str, str] | None = None, timeout: float = 1800, **kwargs
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "quantcheck.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        **kwargs,
    )


def write_questions(path: Path, count: int, xss_at: int | None = None) -> Path:
    """The first `count` MMLU virology questions as JSONL (one made hostile, for the report's escaping)."""
    lines = []
    for index, item in enumerate(load_dataset("mmlu:virology").items[:count]):
        question = XSS_QUESTION if index == xss_at else item.question
        lines.append(
            json.dumps(
                {
                    "id": item.item_id,
                    "subject": item.subject,
                    "question": question,
                    "choices": list(item.choices),
                    "answer": item.answer_letter,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def lowercase_tokenizer_copy(folder: Path) -> Path:
    """The built-in model's weights (linked) with a tokenizer that lower-cases every prompt: another tokenizer, same
    model."""
    from quantcheck.models.builtin import builtin_model_dir

    folder.mkdir()
    for path in builtin_model_dir().iterdir():
        (folder / path.name).symlink_to(path) if path.suffix == ".safetensors" else shutil.copy(
            path, folder / path.name
        )
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A finished run: the built-in model vs `none` and `bnb-nf4`, 8 questions, every phase measured (one cost round:
    the rounds have their own test, `test_cost_drift`)."""
    root = tmp_path_factory.mktemp("small-run")
    questions = write_questions(root / "questions.jsonl", 8, xss_at=2)
    out = root / "run"
    result = quantcheck(
        "run",
        "--quant",
        "none",
        "--quant",
        "bnb-nf4",
        "--dataset",
        str(questions),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "8",
        "--gen-batch-size",
        "4",
        "--cost-rounds",
        "1",
        *SMALL_COST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "run.log").write_text(result.stderr)  # progress and findings, in the order printed
    return out


def _vllm_python() -> str | None:
    """The Python that has vLLM, found as `make test` makes it: QUANTCHECK_VLLM_PYTHON where set, else this checkout's
    .venv-vllm (so a plain `pytest` after `make test` runs the vLLM tests too)."""
    named = os.environ.get("QUANTCHECK_VLLM_PYTHON")
    if named:
        return named if Path(named).exists() else None
    built = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    return str(built) if built.exists() else None


VLLM_PYTHON = _vllm_python()
HAS_VLLM = VLLM_PYTHON is not None
if HAS_VLLM:  # the CLI runs the tests start find it as the user's would
    os.environ["QUANTCHECK_VLLM_PYTHON"] = VLLM_PYTHON
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="no vLLM environment: make test builds .venv-vllm (or set QUANTCHECK_VLLM_PYTHON)"
)
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
GGUF_VARIANTS = ["gguf:F32", "gguf:Q8_0", "gguf:Q4_K_M"]


@pytest.fixture(scope="session")
def virology_engines_run(tmp_path_factory) -> Path:
    """The 166 virology questions: the transformers fp32 reference against the same model in each engine installed,
    vLLM fp32 and llama.cpp's F32, Q8_0 and Q4_K_M GGUFs. One reference pass serves the vLLM and llama.cpp tests."""
    variants = (["vllm:none"] if HAS_VLLM else []) + (GGUF_VARIANTS if HAS_LLAMA_CPP else [])
    if not variants:
        pytest.skip("neither vLLM nor llama.cpp is installed (`make test` builds both)")
    out = tmp_path_factory.mktemp("virology-engines") / "run"
    quants = [argument for name in variants for argument in ("--quant", name)]
    result = quantcheck("run", *quants, "--out", str(out), "--skip-generation", "--skip-cost", "--no-floors")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def read_items(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]


SHARED_FIXTURE_MODULES = {
    "small_run": ("test_api", "test_cli_errors", "test_end_to_end", "test_report_real_run"),
    "virology_engines_run": ("test_llamacpp_backend", "test_vllm_backend"),
}
"""The modules that use each of our session fixtures: under `make test`'s two workers they run in one worker, so each
fixture (a real run of minutes) runs once. Checked at collection: a module that starts using one must be listed."""
MODULE_GROUP = {module: fixture for fixture, modules in SHARED_FIXTURE_MODULES.items() for module in modules}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    users: dict[str, set[str]] = {}
    for item in items:
        for name in item.fixturenames:
            definitions = item._fixtureinfo.name2fixturedefs.get(name) or ()
            if any(d.scope == "session" and d.baseid for d in definitions):  # ours: pytest's own have no baseid
                users.setdefault(name, set()).add(item.module.__name__)
    for name, modules in users.items():
        if len(modules) > 1 and not modules <= set(SHARED_FIXTURE_MODULES.get(name, ())):
            raise pytest.UsageError(
                f"the session fixture {name} is used by {', '.join(sorted(modules))}: "
                "list them under it in SHARED_FIXTURE_MODULES (tests/conftest.py)"
            )


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadscope` (make test), with the modules of each SHARED_FIXTURE_MODULES entry as one scope."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return MODULE_GROUP.get(Path(module).stem, module)

    return SharedFixtureScheduling(config, log)


def assert_inconclusive_on_few_questions(model: dict, questions: int, memory: str = "pass") -> None:
    """A variant judged on fewer questions than a check needs (MIN_UNITS, 10): INCONCLUSIVE whatever its numbers, every
    quality check unclear and saying why; the memory check as given."""
    verdict = model["verdict"]
    assert verdict["decision"] == "INCONCLUSIVE", verdict
    quality = {name: state for name, state in verdict["checks"].items() if name != "memory"}
    assert quality and set(quality.values()) == {"unclear"}, verdict["checks"]
    assert verdict["checks"]["memory"] == memory, verdict["checks"]
    why = f"only {questions} question{'s' if questions > 1 else ''}, fewer than the 10"
    assert sum(why in reason for reason in verdict["reasons"]) == len(quality), verdict["reasons"]
