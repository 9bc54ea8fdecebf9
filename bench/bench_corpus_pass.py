"""A variant's text-corpus pass against the engine computing the same rows bare (the corpus issue's speed target).

In one process, same threads, the built-in model's windows of `text:builtin`:
- the reference's pass fills a compact store (top 64 + 128 tail samples per scored token);
- bare: transformers `model(input_ids=windows)` over the same windows and batches; vLLM (`--backend vllm`, run
  with vLLM's python) one `generate` per window asking for one prompt log-probability per position, the same rows
  computed, nothing kept;
- pass: the variant's quantcheck pass, `score_windows` with the backend's `window_logprobs` (the scored rows'
  log-softmax), KL with bounds from the compact store, top-1, Jaccard@k and NLL per token, each batch appended and
  fsynced.
Prints seconds per 1,000 scored tokens for both, their ratio (target <= 1.2 for transformers, <= 1.3 for vLLM), and
the store's bytes per scored position beside llama.cpp's uint16 full-vocabulary row. vLLM runs one engine (the
fp32 reference's weights, `none`) for both the store and the timed passes: a second engine in one process is not
supported, and the ratio measures the pass, not the variant.
Usage: python bench/bench_corpus_pass.py [--backend hf|vllm] [--windows 16] [--context 512] [--variant bf16]
[--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROUNDS = 2
BATCH_SIZE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--variant", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.backend == "vllm":
        args.variant = "none"

    from quantcheck.backends import get_backend
    from quantcheck.data.corpus import first_scored, load_corpus, make_windows, scored_per_window
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import ModelSpec
    from quantcheck.scoring.corpus import score_windows
    from quantcheck.storage.store import CompactStore, StoreSettings, append_records

    def backend(name: str, method: str, run_dir: str):
        spec = ModelSpec(
            name=name,
            role="reference" if method == "none" else "variant",
            backend=args.backend,
            method=method,
            weights=str(builtin_model_dir()),
        )
        job = JobSpec(
            kind="quality",
            run_dir=run_dir,
            model=spec,
            device="cpu",
            dtype="float32",
            threads=args.threads,
            seed=0,
            batch_size=BATCH_SIZE,
        )
        engine = get_backend(args.backend)(job)
        engine.load()
        return engine

    with tempfile.TemporaryDirectory() as run_dir:
        reference = backend("reference", "none", run_dir)
        windows = make_windows(reference.tokenizer, load_corpus("text:builtin").text, args.context, args.windows)
        firsts, scored = [first_scored(args.context)] * len(windows), scored_per_window(args.context)
        settings = StoreSettings()
        store = CompactStore(Path(run_dir), settings.top_k, settings.tail_samples)
        store.create(len(windows) * scored, reference.vocab_width)
        score_windows(
            reference.window_logprobs,
            "reference",
            windows,
            firsts,
            batch_size=BATCH_SIZE,
            reference=store,
            is_reference=True,
            compare_tokens=True,
            done=set(),
            on_batch=lambda records: None,
        )
        if args.backend == "vllm":
            variant = reference
            bare = _vllm_bare(variant, windows)
        else:
            del reference
            variant = backend(args.variant, args.variant, run_dir)
            batches = [windows[start : start + BATCH_SIZE] for start in range(0, len(windows), BATCH_SIZE)]

            def bare() -> None:
                with torch.no_grad():
                    for batch in batches:
                        variant.model(input_ids=torch.tensor(batch))

        def quantcheck_pass(round_index: int) -> None:
            records = Path(run_dir) / f"corpus-{round_index}.jsonl"
            score_windows(
                variant.window_logprobs,
                args.variant,
                windows,
                firsts,
                batch_size=BATCH_SIZE,
                reference=store,
                is_reference=False,
                compare_tokens=True,
                done=set(),
                on_batch=lambda batch: append_records(records, batch),
            )

        bare()  # warm-up
        bare_times, pass_times = [], []
        for round_index in range(ROUNDS):
            start = time.perf_counter()
            bare()
            bare_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            quantcheck_pass(round_index)
            pass_times.append(time.perf_counter() - start)
        tokens = len(windows) * scored
        per_thousand = lambda seconds: 1000 * seconds / tokens  # noqa: E731
        bare_s, pass_s = min(bare_times), min(pass_times)
        print(
            f"text:builtin, {len(windows)} windows of {args.context} tokens ({tokens} scored), "
            f"{args.variant} against the fp32 "
            f"reference's compact store, {args.threads} threads, best of {ROUNDS}"
        )
        print(f"bare forward:     {per_thousand(bare_s):.3f} s per 1,000 scored tokens")
        print(f"quantcheck pass:  {per_thousand(pass_s):.3f} s per 1,000 scored tokens")
        target = 1.3 if args.backend == "vllm" else 1.2
        print(f"ratio:            {pass_s / bare_s:.2f}x (target <= {target}), {args.backend}")
        print(
            f"store:            {store.bytes_per_row(variant.vocab_width):,} bytes per scored position "
            f"(llama.cpp's base file: {2 * variant.vocab_width + 8:,}, "
            f"{(2 * variant.vocab_width + 8) / store.bytes_per_row(variant.vocab_width):.0f}x more)"
        )


def _vllm_bare(engine, windows):
    """vLLM computing every prompt position's row of each window and nothing else: one request per window, as the
    pass sends them; the runner's rows are dropped as they come."""
    from vllm import SamplingParams

    from quantcheck.backends.vllm import _PROMPT_ROWS

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)

    def bare() -> None:
        for window in windows:
            engine.llm.generate(engine._token_prompts([window]), params, use_tqdm=False)
            _PROMPT_ROWS.chunks.clear()

    return bare


if __name__ == "__main__":
    main()
