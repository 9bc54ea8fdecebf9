"""Make one llm-compressor checkpoint: run as a script by llm-compressor's own Python (`models.calibrated`).

    python llmc_maker.py REQUEST.json

REQUEST: {"recipe", "reference", "calibrated", "calibration" (a text file), "samples", "seq_len", "group_size",
"iters", "seed", "out", "trust_remote_code"}; torch's threads come from OMP_NUM_THREADS, as the parent sets it.
It imports nothing of quantcheck's (that environment has llmcompressor's pins, not quantcheck's), writes the
compressed-tensors checkpoint and `made.json` (seconds, versions) into `out`, and exits non-zero with one line on
stderr when the recipe cannot be made.
"""

from __future__ import annotations

import json
import random
import sys
import time
from importlib import metadata


def _scheme(group_size: int):
    """W4A16 with the group size given: the preset's 128 does not divide the built-in model's 576-wide rows."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(name: str, group_size: int, iters: int | None):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    w4a16 = _scheme(group_size)
    recipes = {
        "rtn-w4a16": lambda: QuantizationModifier(config_groups=w4a16, ignore=["lm_head"]),
        "gptq-w4a16": lambda: GPTQModifier(config_groups=w4a16, ignore=["lm_head"]),
        "awq-w4a16": lambda: [AWQModifier(), QuantizationModifier(config_groups=w4a16, ignore=["lm_head"])],
        "autoround-w4a16": lambda: _autoround(w4a16, iters),
        "w8a8": lambda: [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(scheme="W8A8", targets="Linear", ignore=["lm_head"]),
        ],
        "fp8-dynamic": lambda: QuantizationModifier(scheme="FP8_DYNAMIC", targets="Linear", ignore=["lm_head"]),
    }
    return recipes[name]()


def _autoround(w4a16, iters: int):
    """AutoRound, imported only when asked for (an older llmcompressor may lack it); torch.compile of the tuning loop
    only pays off on a GPU, on CPU its compile time dominates a short tuning."""
    import torch
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    return AutoRoundModifier(
        config_groups=w4a16, ignore=["lm_head"], iters=iters, enable_torch_compile=torch.cuda.is_available()
    )


def _calibration(tokenizer, path: str, samples: int, seq_len: int, seed: int):
    """`samples` windows of `seq_len` tokens drawn (seeded) from the calibration text's consecutive windows."""
    from datasets import Dataset

    ids = tokenizer(open(path, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + seq_len] for start in range(0, len(ids) - seq_len + 1, seq_len)]
    if len(windows) < samples:
        raise SystemExit(f"the calibration text holds {len(windows)} windows of {seq_len} tokens, {samples} asked")
    chosen = random.Random(seed).sample(windows, samples)
    return Dataset.from_dict({"input_ids": chosen, "attention_mask": [[1] * seq_len for _ in chosen]})


def main(request_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    request = json.loads(open(request_file).read())
    if not torch.accelerator.is_available():  # AWQ pins its cached activations unconditionally (no CPU path)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    from llmcompressor import oneshot

    torch.manual_seed(request["seed"])
    trust = request["trust_remote_code"]
    tokenizer = AutoTokenizer.from_pretrained(request["reference"], trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(request["reference"], dtype=torch.float32, trust_remote_code=trust)
    calibration = {}
    if request["calibrated"]:  # round-to-nearest and FP8 need no data (llm-compressor's data-free pipeline)
        dataset = _calibration(
            tokenizer, request["calibration"], request["samples"], request["seq_len"], request["seed"]
        )
        calibration = dict(
            dataset=dataset, num_calibration_samples=request["samples"], max_seq_length=request["seq_len"]
        )
    start = time.perf_counter()
    oneshot(model=model, recipe=_recipe(request["recipe"], request["group_size"], request["iters"]), **calibration)
    seconds = time.perf_counter() - start
    model.save_pretrained(request["out"], save_compressed=True)
    tokenizer.save_pretrained(request["out"])
    packages = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    versions = {name: metadata.version(name) for name in packages}
    made = {"recipe": request["recipe"], "iters": request["iters"], "seconds": seconds, "versions": versions}
    with open(f"{request['out']}/made.json", "w") as handle:
        json.dump(made, handle)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except SystemExit:
        raise
    except Exception as error:  # one line for the parent; the library's own output is in the log
        print(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
