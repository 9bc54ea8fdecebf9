"""The child process: loads one model and does one job, writing every finished batch to disk.

Started by the launcher as `python -m quantcheck.orchestration.worker JOB.json`. Progress goes to stdout as
prefixed JSON lines; library chatter goes to the model's log file. Exit 0 on success, 2 on a
problem the user can fix (message in `<kind>.error.json`), 130 on Ctrl-C, 1 on anything else.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from quantcheck.errors import QuantcheckError
from quantcheck.schema.jobs import JobSpec, emit
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import write_json_atomic


def run_quality(job: JobSpec, folder: RunFolder) -> None:
    """Load the model, then do the job's task (`quantcheck.tasks`) through it."""
    from quantcheck.backends import get_backend
    from quantcheck.tasks import task_named

    spec = job.model
    backend = get_backend(spec.backend)(job)
    emit("phase", phase="load", model=spec.name)
    start = time.perf_counter()
    backend.load()
    write_json_atomic(
        folder.model_file(spec.folder, "engine.json"),
        _engine_info(backend, folder.model_file(spec.folder, "engine.json")),
    )
    emit("loaded", seconds=time.perf_counter() - start)
    task_named(job.task).run(job, folder, backend)


def _engine_info(backend, stored: Path):
    """The engine's description; a served model's tokenizer check is kept from an earlier job of this run where this
    one does not repeat it (a resumed generation), so a resume cannot forget that a tokenizer was never verified."""
    from quantcheck.schema.results import EngineInfo

    engine = backend.describe()
    if engine.tokenizer_verified is None and stored.exists():
        earlier = EngineInfo.model_validate_json(stored.read_text())
        if earlier.tokenizer_verified is not None:
            check = (
                {"tokenizer_check": earlier.parallel["tokenizer_check"]}
                if "tokenizer_check" in earlier.parallel
                else {}
            )
            engine = engine.model_copy(
                update={"tokenizer_verified": earlier.tokenizer_verified, "parallel": {**engine.parallel, **check}}
            )
    return engine


def run_cost(job: JobSpec, folder: RunFolder) -> None:
    from quantcheck.backends import get_backend
    from quantcheck.cost.scenario import CostSettings

    backend = get_backend(job.model.backend)(job)
    settings = CostSettings(**(job.cost or {}))
    emit("phase", phase="cost", model=job.model.name, total=len(settings.batch_sizes) + 2)
    texts = folder.cost_texts()
    cost = backend.measure_cost(texts, settings, on_step=lambda step: emit("advance", phase="cost", step=step))
    write_json_atomic(folder.cost_file(job.model.folder, job.cost_round), cost)


def main(argv: list[str]) -> int:
    spec = JobSpec.model_validate_json(Path(argv[1]).read_text())
    folder = RunFolder(Path(spec.run_dir))
    error_file = folder.model_file(spec.model.folder, f"{spec.kind}.error.json")
    error_file.unlink(missing_ok=True)
    try:
        import torch

        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        (run_quality if spec.kind == "quality" else run_cost)(spec, folder)
        return 0
    except KeyboardInterrupt:
        return 130
    except QuantcheckError as error:
        write_json_atomic(error_file, {"message": str(error)})
        return 2
    except Exception as error:  # recorded for this model; the run goes on with the others
        traceback.print_exc(file=sys.stderr)
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        kind = (
            "out of memory"
            if "out of memory" in first_line.lower() or isinstance(error, MemoryError)
            else type(error).__name__
        )
        write_json_atomic(error_file, {"message": f"{kind}: {first_line}"})
        return 1


def exit_now(code: int) -> None:
    """End the worker once its files are written, skipping the interpreter's teardown when nothing it started
    outlives it: vLLM's engine shutdown alone took 6 s on CPU (a full garbage collection), torch's a few.
    An engine with processes of its own (multi-GPU, Ray) is shut down the normal way."""
    import psutil

    sys.stdout.flush()
    sys.stderr.flush()
    if not psutil.Process().children():
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv))
