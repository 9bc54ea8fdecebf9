"""A run never loses finished work: SIGKILL and resume, adding a variant, Ctrl-C, write errors."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import lowercase_tokenizer_copy, quantcheck, read_items, read_results, write_questions
from quantcheck.schema.results import ItemRecord
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import StoreSettings, append_records, open_reference_store, read_records

N_QUESTIONS = 8
COMMON = ["--batch-size", "2", "--max-new-tokens", "4", "--gen-batch-size", "4", "--skip-cost"]


def run_args(questions: Path, out: Path, *quants: str) -> list[str]:
    return [
        "run",
        *[arg for quant in quants for arg in ("--quant", quant)],
        "--dataset",
        str(questions),
        "--out",
        str(out),
        *COMMON,
    ]


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def start(args: list[str]) -> subprocess.Popen:
    """The CLI in its own process group, so a signal reaches the parent and its worker alike.

    SIGINT is set back to its default first: a suite started in the background (`make test &`)
    inherits it ignored, and Python then never raises KeyboardInterrupt, as a user's terminal would.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "quantcheck.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_lines(process: subprocess.Popen, path: Path, at_least: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while line_count(path) < at_least:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never reached {at_least} lines"
        time.sleep(0.2)


def deterministic(results: dict) -> list[dict]:
    """What must be bit-identical between runs on CPU: everything per model except timings."""
    models = []
    for model in results["models"]:
        model = dict(model)
        generative = dict(model.pop("generative"))
        for timing in ("words_per_minute", "tokens_per_second"):
            generative.pop(timing)
        models.append({**model, "generative": generative})
    return models


def assert_same(resumed: object, clean: object, where: str = "") -> None:
    """Equal, floats to 1e-6 relative: the resumed variant's later batches run in a second process,
    where a CPU kernel may order a float sum differently (a full suite once saw the resumed bnb-nf4
    results differ from the clean run's; five reruns, one under load, could not reproduce it). Answers,
    ids, counts and texts must still be identical."""
    if isinstance(resumed, float) and isinstance(clean, float):
        assert math.isclose(resumed, clean, rel_tol=1e-6, abs_tol=1e-12), f"{where}: {resumed} != {clean}"
    elif isinstance(resumed, dict) and isinstance(clean, dict):
        assert resumed.keys() == clean.keys(), f"{where}: {sorted(resumed)} != {sorted(clean)}"
        for key in resumed:
            assert_same(resumed[key], clean[key], f"{where}.{key}")
    elif isinstance(resumed, list) and isinstance(clean, list):
        assert len(resumed) == len(clean), f"{where}: {len(resumed)} != {len(clean)} entries"
        for index, (a, b) in enumerate(zip(resumed, clean)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert resumed == clean, f"{where}: {resumed!r} != {clean!r}"


def strip_seconds(items: list[dict]) -> list[dict]:
    return [{**item, "generative": {**item["generative"], "seconds": None}} for item in items]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    return write_questions(tmp_path_factory.mktemp("questions") / "q.jsonl", N_QUESTIONS)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, questions) -> Path:
    out = tmp_path_factory.mktemp("clean") / "run"
    result = quantcheck(*run_args(questions, out, "none", "bnb-nf4"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_sigkill_in_the_middle_of_a_variant_then_resume(tmp_path, questions, clean_run):
    out = tmp_path / "run"
    process = start(run_args(questions, out, "none", "bnb-nf4"))
    variant_items = out / "models" / "bnb-nf4" / "quality.jsonl"
    wait_for_lines(process, variant_items, 2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = line_count(variant_items)
    assert 0 < finished_before < N_QUESTIONS
    reference_job = out / "models" / "reference" / "quality.job.json"
    reference_job_time = reference_job.stat().st_mtime_ns

    resumed = quantcheck(*run_args(questions, out, "none", "bnb-nf4"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    # Finished items were not recomputed: each item is in the file once, and the reference never reran.
    for model in ("reference", "none", "bnb-nf4"):
        assert line_count(out / "models" / model / "quality.jsonl") == N_QUESTIONS
    assert reference_job.stat().st_mtime_ns == reference_job_time
    assert "reference (quality): loaded" not in resumed.stderr
    # ... and the final results equal an uninterrupted run's, bit for bit where they are deterministic.
    assert_same(deterministic(read_results(out)), deterministic(read_results(clean_run)), "results")
    assert_same(strip_seconds(read_items(out)), strip_seconds(read_items(clean_run)), "items")


def test_adding_a_variant_does_not_load_the_reference_again(tmp_path, questions, clean_run):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out)
    shutil.rmtree(out / "models" / "bnb-nf4")
    first = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in first["models"]] == ["reference", "none", "bnb-nf4"]
    result = quantcheck(*run_args(questions, out, "none", "bnb-nf4"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reference (quality): loaded" not in result.stderr and "none (quality): loaded" not in result.stderr
    assert "bnb-nf4 (quality): loaded" in result.stderr
    assert "reference quality: skipped (already finished)" in result.stderr
    assert line_count(out / "models" / "reference" / "quality.jsonl") == N_QUESTIONS


def test_ctrl_c_stops_with_130_and_resume_advice(tmp_path, questions):
    out = tmp_path / "run"
    process = start(run_args(questions, out, "none"))
    wait_for_lines(process, out / "models" / "reference" / "quality.jsonl", 2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    kept = line_count(out / "models" / "reference" / "quality.jsonl")
    assert kept >= 2
    records = [json.loads(line) for line in (out / "models" / "reference" / "quality.jsonl").read_text().splitlines()]
    assert all(record["loglik"] is not None for record in records)


def test_a_different_experiment_in_the_same_folder_is_refused(tmp_path, questions, clean_run):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(clean_run / "run.json", out / "run.json")
    refused = quantcheck("run", "--quant", "none", "--dataset", "mmlu:anatomy", "--out", str(out), "--skip-cost")
    assert refused.returncode == 2
    assert (
        "holds a different run" in refused.stderr and "--force" in refused.stderr and "Traceback" not in refused.stderr
    )
    assert json.loads((out / "run.json").read_text()) == json.loads((clean_run / "run.json").read_text())


def test_a_changed_setting_recomputes_stored_outputs_and_says_why(tmp_path):
    folder = RunFolder(tmp_path)
    key = {"model": "m", "dtype": "float32"}
    assert folder.check_reference_key(key) is None
    (tmp_path / "models" / "none").mkdir(parents=True)
    (tmp_path / "models" / "none" / "quality.jsonl").write_text("{}\n")
    assert folder.check_reference_key(key) is None
    reason = folder.check_reference_key({"model": "m", "dtype": "bfloat16"})
    assert reason is not None and "dtype 'float32' -> 'bfloat16'" in reason and "recomputing" in reason
    assert not (tmp_path / "models").exists()


def test_a_write_error_during_the_run_is_one_line_and_the_run_resumes(tmp_path, questions):
    out = tmp_path / "run"
    limit = 512 * 1024  # the full reference store (8 x 49k x 4 bytes) cannot be written

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(
        [sys.executable, "-m", "quantcheck.cli", *run_args(questions, out, "none"), "--store", "full"],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert failed.returncode == 2, failed.stderr[-2000:]
    last = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(last) == 1 and "cannot write" in last[0] and "logprobs.npy" in last[0] and "Traceback" not in failed.stderr
    )
    assert "it needs 1.5 MiB and no room for it" in last[0]  # 8 rows x 49152 x 4 bytes, said before any row is scored
    assert (out / "dataset.jsonl").exists() and (out / "run.json").exists()
    resumed = quantcheck(*run_args(questions, out, "none"), "--store", "full")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert line_count(out / "models" / "reference" / "quality.jsonl") == N_QUESTIONS


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    """A full disk cuts an append short: the next append must not join onto the torn line (resume would then fail
    to read it); the torn record is cut and its batch redone."""
    path = tmp_path / "quality.jsonl"
    records = [ItemRecord(item_id=f"q{i}", model="m", answer="A") for i in range(3)]
    append_records(path, records[:2])
    with path.open("ab") as handle:
        handle.write(records[2].model_dump_json().encode()[:25])
    assert [record.item_id for record in read_records(path, ItemRecord)] == ["q0", "q1"]
    append_records(path, records[2:])
    assert [record.item_id for record in read_records(path, ItemRecord)] == ["q0", "q1", "q2"]
    assert path.read_text().count("\n") == 3


@pytest.mark.parametrize("kind", ["full", "compact"])
def test_the_reference_store_takes_its_disk_space_when_it_is_made(tmp_path, kind):
    """A sparse store would take its blocks only when a row is written, and a full disk then kills the worker with
    SIGBUS; its space is allocated when it is made, where a full disk is one line."""
    store = open_reference_store(tmp_path, StoreSettings(kind=kind))
    assert store.create(16, 49152)
    size = store.path.stat().st_size
    assert size >= 16 * store.bytes_per_row(49152)
    assert store.path.stat().st_blocks * 512 >= size


def test_a_variant_with_another_tokenizer_keeps_accuracy_but_refuses_token_metrics(tmp_path, questions):
    """A pre-quantized checkpoint may bring its own tokenizer; here one that lower-cases every prompt."""
    variant = lowercase_tokenizer_copy(tmp_path / "lowercase-tokenizer")
    out = tmp_path / "run"
    result = quantcheck(
        "run",
        "--quant",
        f"pretrained:{variant}",
        "--dataset",
        str(questions),
        "--limit",
        "4",
        "--out",
        str(out),
        "--skip-cost",
        "--skip-generation",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_results(out)
    checkpoint = results["models"][1]
    assert checkpoint["name"] == "pretrained-lowercase-tokenizer"
    assert checkpoint["loglik"]["n"] == 4 and checkpoint["paired_loglik"] is not None
    assert checkpoint["agreement"] is None
    assert any(w["code"] == "tokenizer-mismatch" and w["model"] == checkpoint["name"] for w in results["warnings"])
    assert all(item["kl"] is None for item in read_items(out) if item["model"] == checkpoint["name"])


def test_a_variant_that_crashes_is_recorded_and_the_run_goes_on(tmp_path, questions):
    """A checkpoint whose weights file is garbage: its worker fails, the reference's results survive."""
    from quantcheck.models.builtin import builtin_model_dir

    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_model_dir() / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "run"
    result = quantcheck(
        "run",
        "--quant",
        f"pretrained:{broken}",
        "--quant",
        "none",
        "--dataset",
        str(questions),
        "--limit",
        "2",
        "--out",
        str(out),
        "--skip-cost",
        "--skip-generation",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pretrained-broken-checkpoint (quality) failed" in result.stderr
    models = {model["name"]: model for model in read_results(out)["models"]}
    assert models["pretrained-broken-checkpoint"]["status"] == "failed"
    assert models["pretrained-broken-checkpoint"]["errors"] and models["pretrained-broken-checkpoint"]["loglik"] is None
    assert models["none"]["status"] == "ok" and models["none"]["loglik"]["n"] == 2
    assert (out / "report.html").exists()
