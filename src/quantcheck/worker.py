"""The child process: loads one model and does one job, writing every finished batch to disk.

Started by the launcher as `python -m quantcheck.worker JOB.json`. Progress goes to stdout as
prefixed JSON lines; library chatter goes to the model's log file. Exit 0 on success, 2 on a
problem the user can fix (message in `<kind>.error.json`), 130 on Ctrl-C, 1 on anything else.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from quantcheck.errors import QuantcheckError
from quantcheck.jobs import EVENT_PREFIX, JobSpec
from quantcheck.results.store import ReferenceLogprobs, append_records, read_latest_by_id, write_json_atomic
from quantcheck.results.folder import RunFolder


def emit(event: str, **fields: object) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def _load(spec: JobSpec):
    import torch

    from quantcheck.models.loading import load_model, precision_info
    from quantcheck.models.quant_methods import LoadRequest, get_method

    method = get_method(spec.method)
    request = LoadRequest(
        path=spec.model_path,
        device=spec.device,
        dtype=getattr(torch, spec.dtype),
        trust_remote_code=spec.trust_remote_code,
        allow_offload=spec.allow_offload,
        allow_pickle=spec.allow_pickle,
    )
    return lambda: load_model(method, request), lambda model: precision_info(model, method.compute_dtype(request))


def run_quality(spec: JobSpec, folder: RunFolder) -> None:
    from quantcheck.measure.generative import encode_generation_prompts, generate_answers, resolve_settings
    from quantcheck.measure.loglik import encode_items, score_items
    from quantcheck.models.loading import load_tokenizer
    from quantcheck.results.schema import ItemRecord

    items = folder.read_items()
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    load, describe = _load(spec)
    emit("phase", phase="load", model=spec.model_name)
    start = time.perf_counter()
    model = load()
    write_json_atomic(folder.model_file(spec.model_name, "precision.json"), describe(model))
    emit("loaded", seconds=time.perf_counter() - start)

    if spec.loglik:
        encoded = encode_items(tokenizer, items)
        is_reference = spec.model_name == "reference"
        reference = ReferenceLogprobs(folder.reference_logprobs)
        if is_reference:
            folder.write_reference_tokens(encoded.prompt_ids)
            compare_tokens = True
        else:
            compare_tokens = folder.read_reference_tokens() == encoded.prompt_ids
            if not compare_tokens:
                emit("warning", code="tokenizer-mismatch", message=f"{spec.model_name} tokenizes the prompts differently from the reference: KL, Jaccard and top-1 agreement are not computed; accuracy is")
        path = folder.model_file(spec.model_name, "quality.jsonl")
        done = set(read_latest_by_id(path, ItemRecord))
        # The rows are as wide as the output layer (the logits), which can differ from the tokenizer's size.
        if is_reference and reference.create(len(items), model.get_output_embeddings().weight.shape[0]) and done:
            # The stored rows behind these records are gone: score the reference again from scratch.
            path.unlink()
            done = set()
        score_items(
            model, spec.model_name, items, encoded,
            batch_size=spec.batch_size, pad_id=tokenizer.pad_token_id, device=spec.device, reference=reference,
            is_reference=is_reference, compare_tokens=compare_tokens, done=done, on_batch=_phase_sink(path, "loglik", items, done),
        )

    if spec.generation is not None:
        options = spec.generation
        settings = resolve_settings(tokenizer, options.chat, options.temperature, options.greedy, options.max_new_tokens, spec.seed)
        write_json_atomic(folder.model_file(spec.model_name, "generation-settings.json"), settings)
        path = folder.model_file(spec.model_name, "generation.jsonl")
        done = set(read_latest_by_id(path, ItemRecord))
        prompts = encode_generation_prompts(tokenizer, items, settings)
        generate_answers(model, tokenizer, spec.model_name, items, prompts, settings, batch_size=options.batch_size,
                         device=spec.device, done=done, on_batch=_phase_sink(path, "generation", items, done))


def _phase_sink(path: Path, phase: str, items, done: set[str]) -> Callable[[list], None]:
    """Announce a resumable phase and return what keeps each finished batch: append + fsync, then progress."""
    emit("phase", phase=phase, total=len(items), done=len(done & {item.item_id for item in items}))

    def keep(records: list) -> None:
        append_records(path, records)
        emit("advance", phase=phase, count=len(records))

    return keep


def run_cost(spec: JobSpec, folder: RunFolder) -> None:
    from quantcheck.measure.cost import CostSettings, measure_cost
    from quantcheck.models.loading import load_tokenizer

    items = folder.read_items()
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    load, _ = _load(spec)
    settings = CostSettings(**(spec.cost or {}))
    emit("phase", phase="cost", model=spec.model_name, total=len(settings.batch_sizes) + 2)
    texts = [item.question for item in items]
    cost = measure_cost(load, tokenizer, texts, settings, spec.device, on_step=lambda step: emit("advance", phase="cost", step=step))
    write_json_atomic(folder.model_file(spec.model_name, "cost.json"), cost)


def main(argv: list[str]) -> int:
    spec = JobSpec.model_validate_json(Path(argv[1]).read_text())
    folder = RunFolder(Path(spec.run_dir))
    error_file = folder.model_file(spec.model_name, f"{spec.kind}.error.json")
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
        kind = "out of memory" if "out of memory" in first_line.lower() or isinstance(error, MemoryError) else type(error).__name__
        write_json_atomic(error_file, {"message": f"{kind}: {first_line}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
