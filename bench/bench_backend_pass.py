"""The reference's log-likelihood pass over the 166 virology questions, per backend, against bare engine calls.

Prints ratios measured in one run, same threads, same token prompts, same batch plan:
- hf: quantcheck's pass (backend request + KL/top-k bookkeeping + fsynced records) / a bare loop of
  `model(**batch)` over the same batches (target <= 1.15);
- vllm: quantcheck's pass (full rows, read from the sampler in-process) / vLLM's bare `generate` of one token without
  log-probabilities on the same token prompts (target <= 1.2);
- vllm / hf: the two passes against each other (on a CPU about parity; vLLM's kernels should win on a GPU).

Each backend runs in its own process (vLLM under QUANTCHECK_VLLM_PYTHON when it is not importable here).
Usage: python bench/bench_backend_pass.py [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 8
ROUNDS = 2


def _job(backend: str, device: str, threads: int, dtype: str, run_dir: str):
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import ModelSpec

    spec = ModelSpec(
        name="reference", role="reference", backend=backend, method="none", weights=str(builtin_model_dir())
    )
    return JobSpec(
        kind="quality",
        run_dir=run_dir,
        model=spec,
        device=device,
        dtype=dtype,
        threads=threads,
        seed=0,
        batch_size=BATCH_SIZE,
    )


def measure(backend_name: str, device: str, threads: int, questions: str) -> dict[str, float]:
    """In this process: the backend's scoring pass and the bare engine call, best of ROUNDS each.

    The questions come from the parent's run folder (`questions`), as a worker's do: an engine's own
    environment need not have the offline MMLU package."""
    import torch

    from quantcheck.backends import get_backend
    from quantcheck.scoring.loglik import encode_items, model_batches, score_items
    from quantcheck.storage.folder import RunFolder
    from quantcheck.storage.store import FullStore, append_records

    torch.set_num_threads(threads)
    dtype = "float32" if device == "cpu" else "bfloat16"
    with tempfile.TemporaryDirectory() as run_dir:
        backend = get_backend(backend_name)(_job(backend_name, device, threads, dtype, run_dir))
        start = time.perf_counter()
        backend.load()
        load_s = time.perf_counter() - start
        items = RunFolder(Path(questions)).read_items()
        encoded = encode_items(backend.tokenizer, items)
        batches = [prompts for _, prompts in model_batches(encoded, BATCH_SIZE)]
        bare = _bare_call(backend_name, backend)

        def scoring_pass(round_dir: Path) -> None:
            reference = FullStore(round_dir)
            reference.create(len(items), backend.vocab_width)
            score_items(
                backend.next_token_logprobs,
                "reference",
                items,
                encoded,
                batch_size=BATCH_SIZE,
                reference=reference,
                is_reference=True,
                compare_tokens=True,
                done=set(),
                on_batch=lambda records: append_records(round_dir / "quality.jsonl", records),
            )

        for prompts in batches[:2]:
            bare(prompts)  # warm-up
        bare_times, pass_times = [], []
        for round_index in range(ROUNDS):
            start = time.perf_counter()
            for prompts in batches:
                bare(prompts)
            bare_times.append(time.perf_counter() - start)
            round_dir = Path(run_dir) / f"round{round_index}"
            round_dir.mkdir()
            start = time.perf_counter()
            scoring_pass(round_dir)
            pass_times.append(time.perf_counter() - start)
    return {"load_s": load_s, "bare_s": min(bare_times), "pass_s": min(pass_times), "items": len(items)}


def _bare_call(backend_name: str, backend):
    """The engine's own call on the same prompts, with nothing of quantcheck's around it."""
    if backend_name == "hf":
        import torch

        from quantcheck.backends.hf.backend import _keeps_last_logits_only
        from quantcheck.data.batching import left_padded

        extra = _keeps_last_logits_only(backend.model)

        def forward(prompts):
            with torch.no_grad():
                backend.model(**left_padded(prompts, backend.tokenizer.pad_token_id, backend.job.device), **extra)

        return forward
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    return lambda prompts: backend.llm.generate(backend._token_prompts(prompts), params, use_tqdm=False)


def _in_subprocess(backend: str, device: str, threads: int, questions: str) -> dict[str, float]:
    from quantcheck.backends import get_backend
    from quantcheck.orchestration.launcher import worker_environment

    interpreter = get_backend(backend).interpreter()
    output = subprocess.run(
        [
            interpreter,
            __file__,
            "--measure",
            backend,
            "--device",
            device,
            "--threads",
            str(threads),
            "--questions",
            questions,
        ],
        capture_output=True,
        text=True,
        env=worker_environment(),
        check=False,
    )
    if output.returncode != 0:
        raise SystemExit(f"{backend} measurement failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--questions", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.device, args.threads, args.questions)))
        return 0
    from quantcheck.data.load import load_dataset
    from quantcheck.storage.folder import RunFolder

    with tempfile.TemporaryDirectory() as questions:
        RunFolder(Path(questions)).write_dataset(load_dataset("mmlu:virology"))
        hf = _in_subprocess("hf", args.device, args.threads, questions)
        vllm = _in_subprocess("vllm", args.device, args.threads, questions)
    print(f"{hf['items']} questions, batch {BATCH_SIZE}, {args.threads} threads, {args.device}, best of {ROUNDS}")
    print(f"hf:   bare forward {hf['bare_s']:.2f} s   quantcheck pass {hf['pass_s']:.2f} s   load {hf['load_s']:.1f} s")
    print(
        f"vllm: bare generate {vllm['bare_s']:.2f} s   quantcheck pass {vllm['pass_s']:.2f} s   "
        f"engine start {vllm['load_s']:.1f} s"
    )
    hf_ratio, vllm_ratio = hf["pass_s"] / hf["bare_s"], vllm["pass_s"] / vllm["bare_s"]
    print(f"ratio hf pass / bare forward       = {hf_ratio:.3f}  (target <= 1.15)")
    print(f"ratio vllm pass / bare generate    = {vllm_ratio:.3f}  (target <= 1.2)")
    print(f"ratio vllm pass / hf pass          = {vllm['pass_s'] / hf['pass_s']:.3f}")
    return 0 if hf_ratio <= 1.15 and vllm_ratio <= 1.2 else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
