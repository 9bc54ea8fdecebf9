"""Overhead of quantcheck's reference pass over a bare loop of forward calls on the same batches.

Target: quantcheck time / bare-forward time <= 1.15 (every metric comes from the one forward).
Both are timed in this one process, alternating, on the built-in model and the 166 virology
questions; the ratio of the best of each is printed.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from quantcheck.data.load import load_dataset
from quantcheck.measure.loglik import _keeps_last_logits_only, encode_items, model_batches, score_items
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.models.loading import load_model, load_tokenizer
from quantcheck.models.quant_methods import LoadRequest, get_method
from quantcheck.results.store import ReferenceLogprobs, append_records

BATCH_SIZE = 8
ROUNDS = 2


def main() -> int:
    torch.set_num_threads(2)
    path = builtin_model_dir()
    tokenizer = load_tokenizer(str(path))
    model = load_model(get_method("none"), LoadRequest(path=str(path), device="cpu", dtype=torch.float32))
    items = load_dataset("mmlu:virology").items
    encoded = encode_items(tokenizer, items)
    batches = [batch for _, batch in model_batches(encoded, BATCH_SIZE, tokenizer.pad_token_id, "cpu")]
    extra = _keeps_last_logits_only(model)

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch, **extra)

    def quantcheck_pass(folder: Path) -> None:
        reference = ReferenceLogprobs(folder / "logprobs.npy")
        reference.create(len(items), model.config.vocab_size)
        records_path = folder / "quality.jsonl"
        score_items(model, "reference", items, encoded, batch_size=BATCH_SIZE, pad_id=tokenizer.pad_token_id, device="cpu",
                    reference=reference, is_reference=True, compare_tokens=True, done=set(),
                    on_batch=lambda records: append_records(records_path, records))

    bare()  # warm-up
    bare_times, pass_times = [], []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        bare()
        bare_times.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            quantcheck_pass(Path(folder))
            pass_times.append(time.perf_counter() - start)
    ratio = min(pass_times) / min(bare_times)
    print(f"items {len(items)}  batch {BATCH_SIZE}  bare forward {min(bare_times):.2f} s  quantcheck pass {min(pass_times):.2f} s")
    print(f"ratio quantcheck / bare = {ratio:.3f}  (target <= 1.15)")
    return 0 if ratio <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
