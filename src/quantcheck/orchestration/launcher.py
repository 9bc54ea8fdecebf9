"""The parent side of the worker protocol: one fresh process per model and job, watched to the end.

A quality job's worker is forked from the run's fork server (`forkserver.py`: torch and transformers
already imported) when its backend runs under this interpreter. Every other worker starts as a new
interpreter: a cost job (its memory is measured as the process's RSS, so it must hold only what its
own engine imports), an engine in its own environment, a platform without fork, a server that
failed to start. Either way its stdout carries event lines and its stderr goes to the job's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from quantcheck.orchestration.progress import ProgressView
from quantcheck.schema.jobs import EVENT_PREFIX, JobSpec
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import write_json_atomic


@dataclass
class JobOutcome:
    ok: bool
    message: str | None = None
    interrupted: bool = False


def worker_environment() -> dict[str, str]:
    """The environment every worker starts with.

    Workers read only local folders, so the hub is switched off: nothing downloads behind the
    user's back. OpenMP threads sleep at barriers (OMP_WAIT_POLICY=PASSIVE): with libgomp's default
    spinning, two threads on two cores shared with one other busy process ran a forward pass 5-25x
    slower (batch 1: 6.3 s instead of 0.26 s), which would make every CPU timing meaningless.
    libgomp reads it once at start-up, hence here and not in the worker. A value the user set is kept.
    """
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _events(line: str) -> dict | None:
    return json.loads(line[len(EVENT_PREFIX) :]) if line.startswith(EVENT_PREFIX) else None


class Launcher:
    """Starts each job's worker. The fork server starts with the `with` block around a run that has quality jobs and is
    stopped before the cost phase: its imports must never run beside a worker whose time and memory are measured."""

    def __init__(self, fork: bool = True) -> None:
        self.fork = fork and sys.platform == "linux"
        self.server: subprocess.Popen | None = None
        self.ready = False

    def __enter__(self) -> Launcher:
        if self.fork:  # started now: its imports overlap the parent's checks and the data set's loading
            self.server = subprocess.Popen(
                [sys.executable, "-m", "quantcheck.orchestration.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=worker_environment(),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_server()

    def stop_server(self) -> None:
        """Before a cost job and at the end: no idle server (or one still importing) beside a measured worker."""
        if self.server is None:
            return
        server, self.server = self.server, None
        if self.ready and server.poll() is None:
            server.stdin.close()  # the server's loop ends at EOF
            try:
                server.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        server.kill()
        server.wait()

    def _server_ready(self) -> bool:
        """Wait for the server's imports. A server that died (while importing, or since its last job: the OOM killer
        may pick it) is dropped, and jobs start as plain processes."""
        if self.server is not None and not self.ready:
            self.ready = any((event := _events(line)) and event["event"] == "ready" for line in self.server.stdout)
        if self.server is not None and (not self.ready or self.server.poll() is not None):
            self.stop_server()
        return self.server is not None

    def run(self, spec: JobSpec, folder: RunFolder, view: ProgressView) -> JobOutcome:
        """Run one job in its own process; its stdout carries events, everything else goes to its log."""
        from quantcheck.backends import get_backend

        spec_path = folder.model_file(spec.model.folder, f"{spec.kind}.job.json")
        write_json_atomic(spec_path, spec)
        log_path = folder.model_file(spec.model.folder, f"{spec.kind}.log")
        view.start_job(f"{spec.model.name} ({spec.kind})")
        interpreter = get_backend(spec.model.backend).interpreter()  # an engine may live in its own environment
        if spec.kind == "cost":
            self.stop_server()  # a measured worker runs with nothing of the run's beside it
        with log_path.open("a", encoding="utf-8") as log:
            if spec.kind == "quality" and interpreter == sys.executable and self._server_ready():
                returncode, interrupted = self._forked(spec_path, log_path, log, view)
            else:
                returncode, interrupted = _spawned(interpreter, spec_path, log, view)
        shutil.rmtree(folder.offload_dir(spec.model.folder), ignore_errors=True)  # an offloaded model's weights
        if interrupted or returncode == 130:
            return JobOutcome(ok=False, interrupted=True, message="interrupted")
        if returncode == 0:
            return JobOutcome(ok=True)
        error_file = folder.model_file(spec.model.folder, f"{spec.kind}.error.json")
        if error_file.exists():
            return JobOutcome(ok=False, message=json.loads(error_file.read_text())["message"])
        message = f"worker exited with code {returncode}; see {log_path}"
        write_json_atomic(error_file, {"message": message})
        return JobOutcome(ok=False, message=message)

    def _forked(self, spec_path, log_path, log: IO[str], view: ProgressView) -> tuple[int, bool]:
        """One job through the server: its `forked` and `exited` announcements frame the worker's own events."""
        server = self.server
        server.stdin.write(json.dumps({"spec": str(spec_path), "log": str(log_path)}) + "\n")
        server.stdin.flush()
        pid, interrupted = None, False
        lines = iter(server.stdout)
        while True:
            try:
                for event in _follow(lines, view, log):
                    if event["event"] == "forked":
                        pid = event["pid"]
                    elif event["event"] == "exited":
                        return event["code"], interrupted
                break
            except KeyboardInterrupt:
                # The worker finishes the write in progress (appends are whole batches) and exits; the server
                # reports it.
                interrupted = True
                if pid is not None:
                    os.kill(pid, signal.SIGINT)
        self.stop_server()  # it died mid-job: later jobs start as plain processes
        return 1, interrupted


def _spawned(interpreter: str, spec_path, log: IO[str], view: ProgressView) -> tuple[int, bool]:
    """A new interpreter with a temporary folder of its own (TMPDIR), removed when it ends: what an engine leaves
    there (vLLM's rendezvous file) goes with it, however the worker ended (killed, or its fast exit)."""
    with tempfile.TemporaryDirectory(prefix="quantcheck-job-", ignore_cleanup_errors=True) as scratch:
        process = subprocess.Popen(
            [interpreter, "-m", "quantcheck.orchestration.worker", str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**worker_environment(), "TMPDIR": scratch},
        )
        try:
            for _ in _follow(iter(process.stdout), view, log):
                pass
            return process.wait(), False
        except KeyboardInterrupt:
            # The worker finishes the write in progress (appends are whole batches) and exits.
            process.send_signal(signal.SIGINT)
            process.wait()
            return 130, True


def _follow(lines: Iterator[str], view: ProgressView, log: IO[str]) -> Iterator[dict]:
    """The worker's events go to the progress view (and to the caller); any other line to the job's log."""
    for line in lines:
        if (event := _events(line)) is None:
            log.write(line)
            continue
        view.handle(event)
        yield event
