"""Every transformers method that `quantcheck quants` says runs here and no other test loads, loaded and scored for
real in one shared small run (3 questions, one cost round at batch size 1), each one's counted weight bytes held to a
count made here from the method's own definition and the checkpoint's shapes (read from its safetensors header).

The definitions, as the libraries installed here implement them on CPU:
- fp16: 2 bytes a parameter.
- bnb-fp4: 4-bit codes (half a byte) and one bfloat16 absmax per block of 64 (bitsandbytes' CPU kernel repacks both
  at the first forward pass, the one that pages the weights in; on CUDA the absmax stays float32), a 16-entry float32
  code book per layer.
- bnb-int8: one byte a weight, one float32 scale per output row (SCB).
- quanto-int8 and quanto-fp8: one byte a weight, one float32 scale per output row.
- quanto-int4: half a byte a weight, a float32 scale and shift per group; the group is 128 weights along the input,
  or the largest multiple of 32 below it that divides the input width (576 here: 96).
- hqq-4bit and hqq-8bit: half a byte / a byte a weight, a float32 scale and zero per group of 64.
Embeddings (tied with the LM head), norms and the rotary buffer stay float32 in every method.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import quantcheck, read_results
from quantcheck.models.builtin import builtin_model_dir

METHODS = ("fp16", "bnb-fp4", "bnb-int8", "quanto-int8", "quanto-int4", "quanto-fp8", "hqq-4bit", "hqq-8bit")
BATCH_1 = ["--batch-sizes", "1", "--seq-len", "16", "--time-budget", "0.3", "--iterations", "2"]
TOLERANCE = 1e-3
"""Relative: what the definitions leave out is a few bytes a layer (bitsandbytes' code book: 64 bytes)."""
ROTARY_BUFFER = 256  # inv_freq: head_dim / 2 float32 values


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("methods") / "run"
    quants = [argument for method in METHODS for argument in ("--quant", method)]
    result = quantcheck(
        "run",
        *quants,
        "--limit",
        "3",
        "--skip-generation",
        "--no-floors",
        "--cost-rounds",
        "1",
        *BATCH_1,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def checkpoint_shapes() -> dict[str, list[int]]:
    with safe_open(str(builtin_model_dir() / "model.safetensors"), "pt") as tensors:
        return {name: tensors.get_slice(name).get_shape() for name in tensors.keys()}  # noqa: SIM118


def quanto_group(width: int) -> int:
    group = 128
    while width % group and group > 32:
        group -= 32
    return group


def expected_bytes(method: str) -> float:
    shapes = checkpoint_shapes()
    linear = [shape for name, shape in shapes.items() if name.endswith("proj.weight")]
    kept = sum(math.prod(shape) for name, shape in shapes.items() if not name.endswith("proj.weight"))
    if method == "fp16":
        return 2 * (kept + sum(math.prod(shape) for shape in linear)) + ROTARY_BUFFER
    per_layer = {
        "bnb-fp4": lambda rows, cols: rows * cols / 2 + 2 * rows * cols / 64 + 16 * 4,
        "bnb-int8": lambda rows, cols: rows * cols + 4 * rows,
        "quanto-int8": lambda rows, cols: rows * cols + 4 * rows,
        "quanto-fp8": lambda rows, cols: rows * cols + 4 * rows,
        "quanto-int4": lambda rows, cols: rows * cols / 2 + 8 * rows * cols / quanto_group(cols),
        "hqq-4bit": lambda rows, cols: rows * cols / 2 + 8 * rows * cols / 64,
        "hqq-8bit": lambda rows, cols: rows * cols + 8 * rows * cols / 64,
    }[method]
    return 4 * kept + ROTARY_BUFFER + sum(per_layer(rows, cols) for rows, cols in linear)


def test_every_method_loads_scores_and_is_costed(methods_run):
    results = read_results(methods_run)
    assert results["finished"], results["missing"]
    models = {model["name"]: model for model in results["models"]}
    for method in METHODS:
        model = models[method]
        assert model["status"] == "ok" and not model["errors"], model["errors"]
        assert model["paired_loglik"]["n"] == 3 and model["agreement"]["kl"]["mean"]["value"] > 0  # a real rounding
        assert [point["status"] for point in model["cost"]["latency"]] == ["ok"]


@pytest.mark.parametrize("method", METHODS)
def test_counted_weight_bytes_match_the_methods_definition(methods_run, method):
    model = next(model for model in read_results(methods_run)["models"] if model["name"] == method)
    counted = model["cost"]["weights"]["counted_bytes"]
    assert counted == pytest.approx(expected_bytes(method), rel=TOLERANCE), (method, counted, expected_bytes(method))
    parameters = sum(math.prod(shape) for shape in checkpoint_shapes().values())
    assert model["cost"]["weights"]["parameters"] == parameters


@pytest.mark.parametrize("method", ("reference", *METHODS))
def test_the_weights_planned_before_loading_are_within_ten_percent_of_those_measured(methods_run, method):
    """results.json keeps the plan made from config.json beside the measured weights (tests/test_plan.py holds the
    same plan to two published checkpoints)."""
    model = next(model for model in read_results(methods_run)["models"] if model["name"] == method)
    planned, counted = model["planned_weights"]["bytes"], model["cost"]["weights"]["counted_bytes"]
    assert planned == pytest.approx(counted, rel=0.10), (method, planned, counted, model["planned_weights"]["basis"])


def test_a_variant_computing_in_float16_is_warned_in_results_and_report(methods_run):
    results = read_results(methods_run)
    warnings = {
        warning["model"]: warning["message"]
        for warning in results["warnings"]
        if warning["code"] == "precision-mismatch"
    }
    assert warnings["fp16"].startswith("fp16 computes in float16, ") and "float32" in warnings["fp16"]
    assert warnings["fp16"] in (methods_run / "report.md").read_text()
