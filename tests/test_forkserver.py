"""The fork server: quality workers forked with torch and transformers imported, one job at a time, each its own
process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from quantcheck.backends.variants import reference_spec
from quantcheck.orchestration.launcher import Launcher, worker_environment
from quantcheck.orchestration.progress import ProgressView
from quantcheck.schema.jobs import EVENT_PREFIX, JobSpec
from quantcheck.storage.folder import RunFolder

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork server runs on Linux only")


def events(server: subprocess.Popen, until: str) -> list[dict]:
    seen = []
    for line in server.stdout:
        if line.startswith(EVENT_PREFIX):
            seen.append(json.loads(line[len(EVENT_PREFIX) :]))
            if seen[-1]["event"] == until:
                return seen
    raise AssertionError(f"the server ended before {until!r}: {seen}")


def failing_job(folder: Path) -> JobSpec:
    """A quality job whose model folder does not exist: its worker starts, fails and writes why."""
    return JobSpec(
        kind="quality",
        run_dir=str(folder),
        model=reference_spec("hf", str(folder / "no-such-model")),
        device="cpu",
        dtype="float32",
        threads=1,
        seed=0,
        batch_size=1,
    )


def test_each_job_is_a_forked_child_and_the_server_outlives_a_failed_one(tmp_path: Path):
    server = subprocess.Popen(
        [sys.executable, "-m", "quantcheck.orchestration.forkserver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=worker_environment(),
    )
    try:
        events(server, "ready")
        pids = []
        for attempt in range(2):
            folder = tmp_path / f"run{attempt}"
            spec = failing_job(folder)
            spec_path, log_path = tmp_path / f"job{attempt}.json", tmp_path / f"job{attempt}.log"
            spec_path.write_text(spec.model_dump_json())
            server.stdin.write(json.dumps({"spec": str(spec_path), "log": str(log_path)}) + "\n")
            server.stdin.flush()
            seen = events(server, "exited")
            forked = next(event for event in seen if event["event"] == "forked")
            assert forked["pid"] not in (server.pid, os.getpid())
            assert seen[-1]["code"] not in (
                0,
                130,
            )  # the model folder does not exist: the worker fails, the server goes on
            error = json.loads((folder / "models" / "reference" / "quality.error.json").read_text())
            assert "no-such-model" in error["message"]
            assert log_path.exists()  # the child's stderr went to the job's log
            pids.append(forked["pid"])
        assert pids[0] != pids[1]  # a fresh process per job
    finally:
        server.stdin.close()
        assert server.wait(timeout=30) == 0  # EOF ends the server


def test_a_server_killed_between_jobs_is_dropped_and_the_next_job_runs_as_a_plain_process(tmp_path: Path):
    folder = RunFolder(tmp_path)
    with Launcher() as launcher, ProgressView(quiet=True) as view:
        first = launcher.run(failing_job(tmp_path), folder, view)
        assert not first.ok and "no-such-model" in first.message and launcher.server is not None  # forked, server kept
        os.kill(launcher.server.pid, signal.SIGKILL)
        launcher.server.wait()
        (tmp_path / "models" / "reference" / "quality.error.json").unlink()
        second = launcher.run(failing_job(tmp_path), folder, view)
    assert launcher.server is None
    assert not second.ok and "no-such-model" in second.message  # the worker itself ran and said why, not a broken pipe
