"""One writer per run folder: a second run on a folder being written is refused at once and the first finishes as if
alone; a run killed with SIGKILL never blocks the next, which takes over and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import quantcheck, read_items
from quantcheck.errors import ResultsFolderError
from quantcheck.storage.lock import RunLock, current_holder

QUICK = ["--quant", "none", "--limit", "6", "--skip-cost", "--skip-generation", "--no-floors"]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "quantcheck.cli", "run", *QUICK, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # its own process group, so a test can kill it with its workers
    )


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _holds_lock(out: Path) -> bool:
    lock = out / "run.lock"
    return lock.exists() and lock.stat().st_size > 0


def test_a_second_lock_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run.lock"):
        assert current_holder(tmp_path / "run.lock").startswith(f"quantcheck pid {os.getpid()} ")
        with pytest.raises(ResultsFolderError, match=rf"is being written by quantcheck pid {os.getpid()} "):
            RunLock(tmp_path / "run.lock").__enter__()
    assert current_holder(tmp_path / "run.lock") is None
    assert (tmp_path / "run.lock").read_text() == ""  # a clean exit leaves nobody to take over from


def test_a_dead_holders_details_are_taken_over(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 999999, "started": "then", "command": "quantcheck run"}))
    with RunLock(tmp_path / "run.lock") as lock:
        assert lock.took_over.startswith("quantcheck pid 999999 (started then: quantcheck run) stopped without")


def test_two_runs_on_one_folder_the_second_is_refused_and_the_first_finishes_as_if_alone(tmp_path):
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    first = _start(shared)
    _wait_for(lambda: _holds_lock(shared), "the first run to take its folder's lock")
    second = quantcheck("run", *QUICK, "--out", str(shared))
    assert second.returncode == 2
    errors = second.stderr.strip().splitlines()
    assert len(errors) == 1 and f"is being written by quantcheck pid {first.pid} (started " in errors[0], errors
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]

    assert quantcheck("run", *QUICK, "--out", str(alone)).returncode == 0
    shared_items, alone_items = read_items(shared), read_items(alone)
    keys = [(item["model"], item["item_id"]) for item in shared_items]
    assert len(keys) == len(set(keys)) == 2 * 6  # no record written twice
    for name in ("reference", "none"):
        lines = (shared / "models" / name).glob("*.jsonl")
        for path in lines:
            ids = [json.loads(line).get("item_id") for line in path.read_text().splitlines()]
            assert len(ids) == len(set(ids)), path
    quality = lambda items: [(i["model"], i["item_id"], i["loglik"], i["kl"], i["topk_ids"]) for i in items]  # noqa: E731
    assert quality(shared_items) == quality(alone_items)
    assert (shared / "run.lock").read_text() == ""


def test_a_run_killed_with_sigkill_does_not_block_the_next_which_takes_over(tmp_path):
    out = tmp_path / "run"
    victim = _start(out)
    _wait_for(lambda: _holds_lock(out), "the run to take its folder's lock")
    _wait_for(lambda: (out / "models").exists(), "the run to start writing")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert json.loads((out / "run.lock").read_text())["pid"] == victim.pid  # left behind by the dead run

    resumed = quantcheck("run", *QUICK, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = " ".join((resumed.stdout + resumed.stderr).split())
    assert f"quantcheck pid {victim.pid} (started " in said and "stopped without finishing; this run takes over" in said
    assert json.loads((out / "results.json").read_text())["finished"]
