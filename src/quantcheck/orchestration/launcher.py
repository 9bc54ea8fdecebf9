"""The parent side of the worker protocol: one fresh process per model and job, watched to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass

from quantcheck.jobs import EVENT_PREFIX, JobSpec
from quantcheck.orchestration.progress import ProgressView
from quantcheck.results.folder import RunFolder
from quantcheck.results.store import write_json_atomic


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
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"})
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_job(spec: JobSpec, folder: RunFolder, view: ProgressView) -> JobOutcome:
    """Run one job in its own process; its stdout carries events, everything else goes to its log."""
    from quantcheck.backends import get_backend

    spec_path = folder.model_file(spec.model.folder, f"{spec.kind}.job.json")
    write_json_atomic(spec_path, spec)
    log_path = folder.model_file(spec.model.folder, f"{spec.kind}.log")
    view.start_job(f"{spec.model.name} ({spec.kind})")
    interpreter = get_backend(spec.model.backend).interpreter()  # an engine may live in its own environment
    with log_path.open("a", encoding="utf-8") as log:
        process = subprocess.Popen(
            [interpreter, "-m", "quantcheck.orchestration.worker", str(spec_path)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=worker_environment(),
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(EVENT_PREFIX):
                    view.handle(json.loads(line[len(EVENT_PREFIX) :]))
                else:
                    log.write(line)
            returncode = process.wait()
        except KeyboardInterrupt:
            # The worker finishes the write in progress (appends are whole batches) and exits.
            process.send_signal(signal.SIGINT)
            process.wait()
            return JobOutcome(ok=False, interrupted=True, message="interrupted")
    if returncode == 0:
        return JobOutcome(ok=True)
    if returncode == 130:
        return JobOutcome(ok=False, interrupted=True, message="interrupted")
    error_file = folder.model_file(spec.model.folder, f"{spec.kind}.error.json")
    if error_file.exists():
        return JobOutcome(ok=False, message=json.loads(error_file.read_text())["message"])
    message = f"worker exited with code {returncode}; see {log_path}"
    write_json_atomic(error_file, {"message": message})
    return JobOutcome(ok=False, message=message)
