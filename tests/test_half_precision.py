"""A variant that computes in another precision than the reference: fp16 on the built-in fp32 model, loaded and scored
for real (4 questions, one cost round), its weight bytes held to a count made here from the checkpoint's own shapes,
and the precision change warned in results.json and the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import SMALL_COST, quantcheck, read_results
from quantcheck.models.builtin import builtin_model_dir


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("half") / "run"
    result = quantcheck(
        "run",
        "--quant",
        "fp16",
        "--limit",
        "4",
        "--skip-generation",
        "--no-floors",
        "--cost-rounds",
        "1",
        *SMALL_COST,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def checkpoint_parameters() -> int:
    """Elements of every tensor the checkpoint stores (the tied LM head is stored once), read from its header."""
    with safe_open(str(builtin_model_dir() / "model.safetensors"), "pt") as tensors:
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118


def test_fp16_weights_are_two_bytes_a_parameter_and_fp32_four(half_run):
    parameters = checkpoint_parameters()
    models = {model["name"]: model for model in read_results(half_run)["models"]}
    # Besides the parameters only the rotary embedding's inverse frequencies (a few hundred bytes) are held.
    assert models["reference"]["cost"]["weights"]["counted_bytes"] == pytest.approx(4 * parameters, rel=1e-5)
    assert models["fp16"]["cost"]["weights"]["counted_bytes"] == pytest.approx(2 * parameters, rel=1e-5)
    assert models["fp16"]["cost"]["weights"]["parameters"] == parameters
    assert models["fp16"]["cost_vs_reference"]["memory_saving"] == pytest.approx(0.5, abs=1e-5)
    assert models["fp16"]["agreement"]["kl"]["mean"]["value"] > 0  # a real rounding, on the same token ids


def test_a_variant_computing_in_float16_is_warned_in_results_and_report(half_run):
    results = read_results(half_run)
    warnings = [warning for warning in results["warnings"] if warning["code"] == "precision-mismatch"]
    assert [warning["model"] for warning in warnings] == ["fp16"]
    assert warnings[0]["message"].startswith("fp16 computes in float16, ")
    assert "float32" in warnings[0]["message"]
    assert warnings[0]["message"] in (half_run / "report.md").read_text()
