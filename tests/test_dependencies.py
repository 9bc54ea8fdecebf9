"""The declared transformers floor is the oldest release that takes every keyword the code passes."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.version import Version

from quantcheck.models.quant_methods import LoadRequest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

KEYWORD_SINCE = {
    # from_pretrained(dtype=) replaced torch_dtype= in 4.56.0 (huggingface/transformers#39782); before
    # it, dtype= is not the load precision and the model silently loads in its default dtype.
    "dtype": Version("4.56.0"),
    # from_pretrained(disable_mmap=) arrived in 5.6.0 (huggingface/transformers#45547); before it,
    # the model's __init__ fails with an unexpected keyword argument.
    "disable_mmap": Version("5.6.0"),
}


def declared_floor(package: str) -> Version:
    match = re.search(rf'"{package}>=([0-9.]+)"', PYPROJECT.read_text())
    assert match, f"pyproject.toml declares no floor for {package}"
    return Version(match.group(1))


def load_kwargs() -> dict[str, object]:
    """What every CPU load passes to from_pretrained (the GPU path passes a subset)."""
    return LoadRequest(path="unused", device="cpu", dtype=torch.bfloat16).from_pretrained_kwargs()


def test_floor_is_the_release_of_the_newest_keyword_passed():
    kwargs = load_kwargs()
    assert kwargs["dtype"] is torch.bfloat16 and "torch_dtype" not in kwargs
    assert {"dtype", "disable_mmap"} <= set(kwargs)
    assert declared_floor("transformers") == max(KEYWORD_SINCE[key] for key in kwargs if key in KEYWORD_SINCE)


def test_installed_transformers_meets_the_floor():
    assert Version(version("transformers")) >= declared_floor("transformers")


def test_installed_transformers_loads_at_the_requested_dtype(tmp_path):
    """A float32 checkpoint loaded with the code's keywords comes back in bfloat16, not float32."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, **load_kwargs())
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
