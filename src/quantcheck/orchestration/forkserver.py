"""One process per run that imports torch and transformers once, then forks a fresh worker for each job.

Every worker used to pay its own interpreter start and imports (about 4 s of torch and transformers
here) before loading a model: four times for a default run's quality jobs (reference, two floors, a
variant). A child forked from this server starts with those modules already imported and nothing
else: no model, no CUDA context, no thread pool of torch's, so each job still runs in its own
isolated process, as optimum-benchmark's launchers do. Quality jobs only (a cost job's memory is its
process's RSS, which must not include modules its engine would not import), Linux only (fork with
these libraries is not safe on macOS), and only for backends that run under this interpreter; the
launcher starts a plain process whenever the server cannot serve.

Protocol, one job at a time: the parent writes `{"spec": JOB.json, "log": LOG}` on a line to stdin;
the server forks; the child sends its stderr to LOG and runs the worker, whose event lines share the
server's stdout; the server announces `forked` (the child's pid, for signals) and, once the child is
gone, `exited` with its exit code. EOF on stdin ends the server.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from quantcheck.orchestration.worker import exit_now
from quantcheck.schema.jobs import emit

PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "quantcheck.backends.hf",
    "quantcheck.orchestration.worker",
    "quantcheck.tasks",
)


def serve() -> int:
    interrupt = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent and the running job, not the server
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    emit("ready")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request["spec"], request["log"], interrupt)
            finally:
                os._exit(code)
        emit("forked", pid=pid)
        _, status = os.waitpid(pid, 0)
        emit("exited", code=os.waitstatus_to_exitcode(status))
    return 0


def _child(spec: str, log: str, interrupt) -> int:
    """The worker, as `python -m quantcheck.orchestration.worker SPEC` would run it; never returns into the server's
    loop."""
    code = 1
    try:
        signal.signal(signal.SIGINT, interrupt)
        os.dup2(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        from quantcheck.orchestration.worker import main

        code = main(["worker", spec])
    except KeyboardInterrupt:
        code = 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    # The worker's fast exit: the parent waits for this process at the end of every run and before each cost phase,
    # and torch's and transformers' teardown took 1.3 s; every child has been reaped by then.
    exit_now(serve())
