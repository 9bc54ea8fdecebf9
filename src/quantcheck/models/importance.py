"""The importance matrix a GGUF quantization weighs its rounding by: for every linear layer, the mean square of each
input column over calibration text, as llama.cpp's `llama-imatrix` collects it (`collect_imatrix` in its
tools/imatrix: the sum of x*x over tokens, divided by the token count).

Collected here by the reference in transformers (forward hooks on `nn.Linear` inputs) rather than by llama-imatrix,
which `make test` would have to compile (6.5 min on 2 cores): on the same text and windows (the same token ids) the
two differ by 0.012 % of a tensor's norm at most, one column by 7.7 % of its tensor's mean, with a correlation of
0.99999998 or more (`bench/bench_imatrix.py`, against llama-imatrix built from the same llama.cpp).

    python -m quantcheck.models.importance REFERENCE TEXT_FILE SAMPLES SEQ_LEN OUT.npz [--trust-remote-code]

runs in a process of its own (the parent never holds a model): OUT.npz maps each linear module's name to its mean
squares, and `tokens` to how many tokens were seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TOKENS = "tokens"


def windows(ids: list[int], samples: int, seq_len: int) -> list[list[int]]:
    """The first `samples` consecutive windows of `seq_len` tokens, as llama-imatrix cuts its chunks."""
    available = len(ids) // seq_len
    if available < samples:
        raise ValueError(
            f"the calibration text holds {available} windows of {seq_len} tokens and {samples} were asked: "
            "give a longer text or fewer samples"
        )
    return [ids[start * seq_len : (start + 1) * seq_len] for start in range(samples)]


def collect(
    reference: Path, text: str, samples: int, seq_len: int, trust_remote_code: bool = False
) -> dict[str, np.ndarray]:
    """Each linear module's mean square input column over the windows, in float64; `TOKENS`: the token count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        reference, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    chosen = windows(tokenizer(text, add_special_tokens=False)["input_ids"], samples, seq_len)
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(module, inputs, output) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (rows * rows).sum(0)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(accumulate(name))
    with torch.inference_mode():
        for window in chosen:
            model(torch.tensor([window]))
    tokens = samples * seq_len
    return {name: (total / tokens).numpy() for name, total in sums.items()} | {TOKENS: np.array(tokens)}


def main(reference: str, text_file: str, samples: str, seq_len: str, out: str, *flags: str) -> None:
    text = Path(text_file).read_text(encoding="utf-8")
    try:
        collected = collect(Path(reference), text, int(samples), int(seq_len), "--trust-remote-code" in flags)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    with open(out, "wb") as handle:
        np.savez(handle, **collected)


if __name__ == "__main__":
    main(*sys.argv[1:])
