"""The reference store: bytes per position of the compact and the full store, and a variant's pass with each.

Prints:
- bytes per scored position of each store at a 49,152 (the built-in model) and a 128,256 vocabulary,
  against llama.cpp's uint16 full-vocabulary row (target: compact <= 1/50 of it), and what MMLU's
  14,042 questions take;
- the variant's log-likelihood pass (forward + comparison with the stored rows + records) with the
  compact store and with the full store, best of ROUNDS each, and their ratio; and the comparison
  alone (reading the rows and computing KL, bounds, Jaccard) on the same variant rows.

The built-in model plays the reference and the variant (`none`): the store's cost does not depend on
the quantization. With --accuracy METHOD,...: each variant's KL from the compact store against the
full store's on the same rows, item by item (the same functions the two stores' runs call).
Usage: python bench/bench_store.py [--limit N] [--threads N] [--accuracy bnb-nf4-dq,torchao-int8wo]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 8
ROUNDS = 2
MMLU_QUESTIONS = 14_042
LLAMA_CPP_BYTES = 2  # uint16 per vocabulary entry


def sizes() -> None:
    from quantcheck.storage.store import CompactStore, FullStore, StoreSettings

    settings = StoreSettings()
    compact, full = CompactStore(Path("."), settings.top_k, settings.tail_samples), FullStore(Path("."))
    for vocab in (49_152, 128_256):
        llama = LLAMA_CPP_BYTES * vocab
        print(
            f"vocabulary {vocab:,}: compact {compact.bytes_per_row(vocab):,} B/position "
            f"(1/{llama / compact.bytes_per_row(vocab):.0f} of "
            f"llama.cpp's uint16 {llama:,} B; target <= 1/50), full float32 {full.bytes_per_row(vocab):,} B/position; "
            f"MMLU {MMLU_QUESTIONS:,} questions: compact {MMLU_QUESTIONS * compact.bytes_per_row(vocab) / 1e6:.1f} MB, "
            f"full {MMLU_QUESTIONS * full.bytes_per_row(vocab) / 1e9:.2f} GB"
        )


def _loaded(method: str, run_dir: str, threads: int):
    """The built-in model through the transformers backend, quantized by `method`, on the CPU in fp32."""
    from quantcheck.backends.hf import HFBackend
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import ModelSpec

    spec = ModelSpec(name=method, role="variant", backend="hf", method=method, weights=str(builtin_model_dir()))
    backend = HFBackend(
        JobSpec(
            kind="quality",
            run_dir=run_dir,
            model=spec,
            device="cpu",
            dtype="float32",
            threads=threads,
            seed=0,
            batch_size=BATCH_SIZE,
        )
    )
    backend.load()
    return backend


def _stores(run_dir: str) -> dict[str, object]:
    from quantcheck.storage.store import CompactStore, FullStore, StoreSettings

    settings = StoreSettings()
    return {
        "compact": CompactStore(Path(run_dir) / "compact", settings.top_k, settings.tail_samples),
        "full": FullStore(Path(run_dir) / "full"),
    }


def passes(limit: int | None, threads: int) -> None:
    import torch

    from quantcheck.data.load import load_dataset
    from quantcheck.scoring.loglik import compare_with_reference, encode_items, model_batches, score_items
    from quantcheck.storage.store import append_records

    torch.set_num_threads(threads)
    items = load_dataset("mmlu:virology", limit, 0).items
    with tempfile.TemporaryDirectory() as run_dir:
        backend = _loaded("none", run_dir, threads)
        encoded = encode_items(backend.tokenizer, items)
        stores = _stores(run_dir)

        def scoring_pass(store, is_reference: bool, records: Path) -> float:
            start = time.perf_counter()
            score_items(
                backend.next_token_logprobs,
                "none",
                items,
                encoded,
                batch_size=BATCH_SIZE,
                reference=store,
                is_reference=is_reference,
                compare_tokens=True,
                done=set(),
                on_batch=lambda batch: append_records(records, batch),
            )
            return time.perf_counter() - start

        for name, store in stores.items():
            store.create(len(items), backend.vocab_width)
            scoring_pass(store, True, Path(run_dir) / f"reference-{name}.jsonl")
        variant_rows = [
            (rows, torch.from_numpy(backend.next_token_logprobs(prompts)))
            for rows, prompts in model_batches(encoded, BATCH_SIZE)
        ]
        timings = {
            name: min(
                scoring_pass(store, False, Path(run_dir) / f"variant-{name}-{round_index}.jsonl")
                for round_index in range(ROUNDS)
            )
            for name, store in stores.items()
        }
        compare = {}
        for name, store in stores.items():
            start = time.perf_counter()
            for rows, logprobs in variant_rows:
                compare_with_reference(store, rows, logprobs)
            compare[name] = time.perf_counter() - start
    print(f"{len(items)} questions, batch {BATCH_SIZE}, {threads} threads, cpu, best of {ROUNDS}")
    print(
        f"variant pass: compact {timings['compact']:.2f} s   full {timings['full']:.2f} s   "
        f"ratio compact / full = {timings['compact'] / timings['full']:.3f}"
    )
    print(
        f"comparison alone (read rows, KL and bounds): compact {compare['compact']:.3f} s   "
        f"full {compare['full']:.3f} s   "
        f"ratio compact / full = {compare['compact'] / compare['full']:.3f}"
    )


def accuracy(methods: list[str], limit: int | None, threads: int) -> None:
    """Per variant: the compact store's KL estimate and bounds against the full store's exact KL, item by item."""
    import statistics

    import torch

    from quantcheck.data.load import load_dataset
    from quantcheck.scoring.loglik import compare_with_reference, encode_items, model_batches, reference_rows

    torch.set_num_threads(threads)
    items = load_dataset("mmlu:virology", limit, 0).items
    with tempfile.TemporaryDirectory() as run_dir:
        stores = _stores(run_dir)
        reference = _loaded("none", run_dir, threads)
        encoded = encode_items(reference.tokenizer, items)
        batches = list(model_batches(encoded, BATCH_SIZE))
        for store in stores.values():
            store.create(len(items), reference.vocab_width)
        for rows, prompts in batches:
            logprobs = torch.from_numpy(reference.next_token_logprobs(prompts))
            for store in stores.values():
                store.write_rows(rows, reference_rows(store, rows, logprobs))
        del reference
        print(
            f"{len(items)} questions, compact store top {stores['compact'].top_k} + "
            f"{stores['compact'].tail_samples} tail samples"
        )
        for method in methods:
            variant = _loaded(method, run_dir, threads)
            estimate, lower, upper, exact = [], [], [], []
            for rows, prompts in batches:
                logprobs = torch.from_numpy(variant.next_token_logprobs(prompts))
                bounds, _ = compare_with_reference(stores["compact"], rows, logprobs)
                full, _ = compare_with_reference(stores["full"], rows, logprobs)
                estimate += bounds.estimate.tolist()
                lower += bounds.lower.tolist()
                upper += bounds.upper.tolist()
                exact += full.estimate.tolist()
            del variant
            errors = [(e - x) / x for e, x in zip(estimate, exact)]
            wrong = sum(not (lo <= x + 1e-9 and x <= up + 1e-9) for lo, x, up in zip(lower, exact, upper))
            print(
                f"{method}: mean KL full {statistics.fmean(exact):.5f}, compact {statistics.fmean(estimate):.5f} "
                f"(ratio {statistics.fmean(estimate) / statistics.fmean(exact):.4f}); "
                f"per item: signed error {statistics.fmean(errors):+.2%}, "
                f"|error| {statistics.fmean(map(abs, errors)):.2%} (max {max(map(abs, errors)):.1%}); "
                f"lower bound mean {statistics.fmean(lower):.5f} "
                f"({statistics.fmean(lo / x - 1 for lo, x in zip(lower, exact)):+.1%} per item), "
                f"upper bound mean {statistics.fmean(upper):.4f}; "
                f"bounds on the wrong side: {wrong}"
            )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all 166 virology questions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--accuracy", help="comma-separated methods: compare their KL from both stores instead of timing the pass"
    )
    args = parser.parse_args()
    sizes()
    if args.accuracy:
        accuracy(args.accuracy.split(","), args.limit, args.threads)
    else:
        passes(args.limit, args.threads)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
