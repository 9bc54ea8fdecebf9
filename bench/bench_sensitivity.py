"""Per-layer sensitivity's cost: every decoder layer of the built-in model quantized alone, against one variant's pass.

Times, on the same questions and after both models are loaded (no worker start, no load):
- the sensitivity scoring (`scoring.sensitivity.score_layers`): per batch one reference forward that keeps every
  layer's inputs, then each of the 30 layers swapped for the variant's, replayed from its inputs through layers
  i..end and the head, with KL, top-1 and the answer per layer;
- one ordinary variant's log-likelihood pass (`scoring.loglik.score_items`, the worker's path: forward through the
  transformers backend, comparison with the reference's stored rows in the default compact store, records);
best of ROUNDS each, taken in turn, and prints sensitivity / ordinary pass. Target: at most 20x for 30 layers (a layer
replay runs 30 - i layers, so 30 of them cost about 15.5 forwards, plus the reference's own). The reference's own pass
is timed too: on a CPU the variant's 4-bit layers can run faster than the float layers every replay runs, which moves
the ratio to the variant's pass by that factor.
Usage: python bench/bench_sensitivity.py [--limit 24] [--method bnb-nf4] [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

BATCH_SIZE = 8
TARGET = 20.0


def _loaded(method: str, run_dir: str, threads: int):
    """The built-in model through the transformers backend, quantized by `method`, on the CPU in fp32."""
    from quantcheck.backends.hf import HFBackend
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import ModelSpec

    spec = ModelSpec(name=method, role="variant", backend="hf", method=method, weights=str(builtin_model_dir()))
    job = JobSpec(
        kind="quality",
        run_dir=run_dir,
        model=spec,
        device="cpu",
        dtype="float32",
        threads=threads,
        seed=0,
        batch_size=BATCH_SIZE,
    )
    backend = HFBackend(job)
    backend.load()
    return backend


def measure(method: str, limit: int, threads: int, rounds: int) -> None:
    import torch

    from quantcheck.data.load import load_dataset
    from quantcheck.scoring.loglik import encode_items, score_items
    from quantcheck.scoring.sensitivity import score_layers
    from quantcheck.storage.store import CompactStore, StoreSettings

    torch.set_num_threads(threads)
    items = load_dataset("mmlu:virology", limit, 0).items
    with tempfile.TemporaryDirectory() as run_dir:
        reference, variant = _loaded("none", run_dir, threads), _loaded(method, run_dir, threads)
        encoded = encode_items(reference.tokenizer, items)
        settings = StoreSettings()
        store = CompactStore(Path(run_dir) / "reference", settings.top_k, settings.tail_samples)
        store.create(len(items), reference.vocab_width)

        def scoring_pass(backend, is_reference: bool) -> float:
            start = time.perf_counter()
            score_items(
                backend.next_token_logprobs,
                backend.spec.name,
                items,
                encoded,
                batch_size=BATCH_SIZE,
                reference=store,
                is_reference=is_reference,
                compare_tokens=True,
                done=set(),
                on_batch=lambda records: None,
            )
            return time.perf_counter() - start

        def sensitivity() -> float:
            start = time.perf_counter()
            score_layers(
                reference.model,
                variant.model,
                items,
                encoded,
                batch_size=BATCH_SIZE,
                pad_id=reference.tokenizer.pad_token_id,
                seed=0,
            )
            return time.perf_counter() - start

        own = [scoring_pass(reference, True)]  # also the stored rows the variant's pass compares with
        ordinary, layers = [], []
        for _ in range(rounds):
            ordinary.append(scoring_pass(variant, False))
            layers.append(sensitivity())
            own.append(scoring_pass(reference, True))
        count = len(reference.model.get_decoder().layers)
    ratio = min(layers) / min(ordinary)
    print(f"{len(items)} questions, batch {BATCH_SIZE}, {threads} threads, cpu, {method}, best of {rounds}")
    print(
        f"ordinary variant pass {min(ordinary):.2f} s (rounds: {', '.join(f'{t:.2f}' for t in ordinary)}); "
        f"{count}-layer sensitivity {min(layers):.2f} s (rounds: {', '.join(f'{t:.2f}' for t in layers)})"
    )
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"ratio sensitivity / ordinary pass = {ratio:.1f}x (target <= {TARGET:.0f}x: {verdict})")
    print(
        f"for scale: the reference's own pass {min(own):.2f} s; sensitivity / reference pass = "
        f"{min(layers) / min(own):.1f}x (capture and replays: {(count + 1) / 2 + 1:.1f} forwards' worth of layers)"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=24, help="questions (default 24)")
    parser.add_argument("--method", default="bnb-nf4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads: as the workers run (launcher.py)
    measure(arguments.method, arguments.limit, arguments.threads, arguments.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
