"""The guards against the original experiment's biggest mistake: a silently offloaded baseline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import quantcheck
from quantcheck.backends.variants import variant_spec
from quantcheck.errors import QuantcheckError
from quantcheck.models.loading import load_model, precision_info
from quantcheck.models.quant_methods import LoadRequest, QuantMethod


def tiny_model(device_map: dict[str, object] | None) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    if device_map is not None:
        model.hf_device_map = device_map
    return model


def method_returning(model: LlamaForCausalLM) -> QuantMethod:
    return QuantMethod("fake", "returns a prepared model", frozenset({"cpu", "cuda"}), (), "", lambda request: model)


def test_precision_info_records_dtypes_and_devices():
    model = tiny_model(None)
    info = precision_info(model, "float32")
    assert info.parameter_dtypes == {"float32": sum(p.numel() for p in model.parameters())}
    assert info.devices == ["cpu"] and info.offloaded is False


def test_a_model_split_between_gpu_and_cpu_is_refused_unless_allowed():
    split = tiny_model({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"})
    assert precision_info(split, "bfloat16").offloaded is True
    request = LoadRequest(path="unused", device="cuda", dtype=torch.bfloat16)
    with pytest.raises(QuantcheckError, match="offloaded.*--allow-offload"):
        load_model(method_returning(split), request)
    allowed = LoadRequest(path="unused", device="cuda", dtype=torch.bfloat16, allow_offload=True)
    assert load_model(method_returning(split), allowed) is split


def test_meta_parameters_count_as_offloaded():
    with torch.device("meta"):
        model = tiny_model(None)
    assert precision_info(model, "float32").offloaded is True


def test_load_request_places_the_whole_model_on_one_device():
    kwargs = LoadRequest(path="p", device="cuda", dtype=torch.bfloat16).from_pretrained_kwargs()
    assert (
        kwargs["device_map"] == {"": "cuda"} and kwargs["dtype"] is torch.bfloat16 and kwargs["use_safetensors"] is True
    )
    assert kwargs["trust_remote_code"] is False
    assert (
        LoadRequest(path="p", device="cuda", dtype=torch.bfloat16, allow_offload=True).from_pretrained_kwargs()[
            "device_map"
        ]
        == "auto"
    )


def test_pretrained_checkpoints_are_variants_with_their_own_folder():
    spec = variant_spec("pretrained:TheBloke/Llama-2-7B-GPTQ", "/reference", lambda source: f"/cache/{source}")
    assert (
        spec.name == "pretrained-Llama-2-7B-GPTQ"
        and spec.checkpoint
        and spec.weights == "/cache/TheBloke/Llama-2-7B-GPTQ"
    )
    assert spec.backend == "hf" and spec.role == "variant"
    served = variant_spec("vllm:pretrained:org/model-AWQ", "/reference", lambda source: "/awq")
    assert (served.name, served.backend, served.folder, served.weights) == (
        "vllm:pretrained-model-AWQ",
        "vllm",
        "vllm-pretrained-model-AWQ",
        "/awq",
    )


def test_a_variant_names_its_backend_and_method():
    hf = variant_spec("torchao-int8wo", "/reference", str)
    assert (hf.name, hf.backend, hf.method, hf.weights) == ("torchao-int8wo", "hf", "torchao-int8wo", "/reference")
    assert variant_spec("hf:bnb-nf4", "/reference", str).name == "bnb-nf4"
    served = variant_spec("vllm:fp8_per_channel", "/reference", str)
    assert (served.name, served.backend, served.method, served.folder) == (
        "vllm:fp8_per_channel",
        "vllm",
        "fp8_per_channel",
        "vllm-fp8_per_channel",
    )


def test_a_method_whose_library_has_no_parent_package_reads_as_not_installed():
    """find_spec("optimum.quanto") raises without optimum; `quantcheck quants` crashed on it where quanto is absent
    (found by the GPU check's dry run, whose simulated image lacks optimum)."""
    from quantcheck.models.quant_methods import importable

    assert importable("torch.nn") and importable("torch")
    assert not importable("no_such_package.quanto") and not importable("no_such_package")


def test_a_real_accelerate_offload_is_measured_and_warned_of(tmp_path):
    """--allow-offload with --max-memory-gb 0.2 makes accelerate put most of the 0.5 GB model on disk: the run scores
    it the same as on one device, measures its cost, and results.json, report.html and report.md warn of every
    offloaded model; the offloaded weights go with the worker."""
    common = ["--quant", "none", "--limit", "3", "--skip-generation", "--no-floors", "--quiet"]
    offloaded, whole = tmp_path / "offloaded", tmp_path / "whole"
    cost = ["--cost-rounds", "1", "--batch-sizes", "1", "--seq-len", "16", "--time-budget", "0.5", "--iterations", "3"]
    done = quantcheck("run", *common, *cost, "--allow-offload", "--max-memory-gb", "0.2", "--out", str(offloaded))
    assert done.returncode == 0, done.stderr
    assert quantcheck("run", *common, "--skip-cost", "--out", str(whole)).returncode == 0
    results = json.loads((offloaded / "results.json").read_text())
    for model in results["models"]:
        assert model["precision"]["offloaded"] is True and "disk" in model["precision"]["devices"]
        # --max-memory-gb is the device's share here, not the sweep's cap (which the model alone would exceed)
        assert [(point["batch_size"], point["status"]) for point in model["cost"]["latency"]] == [(1, "ok")]
    warned = {w["model"]: w["message"] for w in results["warnings"] if w["code"] == "offloaded"}
    assert set(warned) == {"reference", "none"}
    for report in ("report.html", "report.md"):
        assert "none is partly offloaded (cpu, disk, meta)" in (offloaded / report).read_text()
    assert not list((offloaded / "models").glob("*/offload")), "the offloaded weights outlive the worker"
    assert not any(w["code"] == "offloaded" for w in json.loads((whole / "results.json").read_text())["warnings"])

    def choice_logprobs(run):
        records = (run / "models" / "reference" / "quality.jsonl").read_text().splitlines()
        return {r["item_id"]: r["loglik"]["choice_logprobs"] for r in map(json.loads, records)}

    on_disk, on_one_device = choice_logprobs(offloaded), choice_logprobs(whole)
    assert on_disk.keys() == on_one_device.keys() and len(on_disk) == 3
    for item, values in on_disk.items():
        assert values == pytest.approx(on_one_device[item], abs=1e-4)
