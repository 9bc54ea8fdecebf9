"""The plan made before loading: weight memory from config.json alone, held to published checkpoint sizes here and to
the measured weights of every method the built-in model runs (tests/test_methods.py); over-budget models refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import quantcheck
from quantcheck.models.plan import ModelShape, checkpoint_footprint

DATA = Path(__file__).parent / "data"
PUBLISHED = {
    # meta-llama/Meta-Llama-3-8B-Instruct: four bf16 safetensors shards, 16.06 GB in all (the model page's file list)
    "llama-3-8b-instruct.config.json": 16.06e9,
    # hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4: two safetensors shards, 5.73 GB in all (its file list; also
    # "a lean 5.7 GB" in n-shot.com's Llama 3.1 quantization comparison)
    "llama-3.1-8b-instruct-awq-int4.config.json": 5.73e9,
}
TOLERANCE = 0.01
"""The issue asked for 10 %; the plan is within 1 % of both, as the README says."""


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_plan_is_within_one_percent_of_published_checkpoint_sizes(name):
    config = json.loads((DATA / name).read_text())
    planned = ModelShape.from_config(config).weight_bytes(checkpoint_footprint(config), dtype_bytes=2)
    assert planned == pytest.approx(PUBLISHED[name], rel=TOLERANCE), planned


def test_a_config_without_the_shapes_is_one_line():
    from quantcheck.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="config.json has no 'hidden_size'"):
        ModelShape.from_config({"model_type": "mystery"})


def test_plan_prints_every_model_and_refuses_a_variant_over_the_budget(tmp_path):
    """`quantcheck plan` loads nothing: a plan of the built-in model, then the same plan refused under --fit-gb."""
    planned = quantcheck("plan", "--quant", "bnb-nf4", "--quant", "gguf:Q4_K_M", "--limit", "20")
    assert planned.returncode == 0, planned.stderr[-2000:]
    lines = planned.stdout.splitlines()
    assert lines[0].startswith("plan (estimates from config.json, before loading")
    assert any(line.startswith("  reference: weights 513.1 MiB") for line in lines), lines
    assert any(line.startswith("  bnb-nf4: weights 161.9 MiB (4-bit weights") for line in lines), lines
    assert any(line.startswith("  gguf:Q4_K_M: weights not planned (llama.cpp picks") for line in lines), lines
    assert any(line.startswith("  reference store on disk: 30.2 KiB (20 questions, compact store") for line in lines)

    refused = quantcheck("plan", "--quant", "bnb-nf4", "--limit", "20", "--fit-gb", "0.1")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "bnb-nf4's weights are planned at 161.9 MiB (estimate" in errors[0], errors
    assert "above --fit-gb 0.1" in errors[0] and "Traceback" not in refused.stderr


def test_plan_takes_runs_options_and_says_what_it_does():
    from typer.testing import CliRunner

    from quantcheck.cli import app

    result = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Plan a run without loading any model" in result.output
    assert "--fit-gb" in result.output and "--quant" in result.output and "--store" in result.output
