"""Consideration 1 (cost) on the real built-in model: weight bytes, peak memory, latency, generation."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import torch

from quantcheck.backends.hf import HFBackend
from quantcheck.backends.hf.generation import (
    fixed_length_config,
    measure_generation,
    neutral_generation_defaults,
    prompt_batches,
)
from quantcheck.cost.memory import PeakMemoryTracker, count_weight_bytes
from quantcheck.cost.scenario import CostSettings, measure_cost
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.models.loading import load_model, load_tokenizer
from quantcheck.models.quant_methods import LoadRequest, get_method
from quantcheck.schema.jobs import JobSpec
from quantcheck.schema.models import ModelSpec

TEXTS = [
    "Which of the following viruses causes the common cold? A. rhinovirus B. prion C. rabies D. measles Answer:",
    "The capital of France is",
    "Vaccines train the immune system by presenting antigens, so that memory cells",
    "Short.",
]


def _load(method: str) -> torch.nn.Module:
    return load_model(get_method(method), LoadRequest(str(builtin_model_dir()), "cpu", torch.float32))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: two OpenMP threads on two shared cores run up to 10x slower when other tests run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(builtin_model_dir()))


@pytest.fixture(scope="module")
def fp32_model():
    return _load("none")


@pytest.fixture(scope="module")
def nf4_model():
    pytest.importorskip("bitsandbytes")
    return _load("bnb-nf4-dq")


@pytest.fixture(scope="module")
def int8wo_model():
    pytest.importorskip("torchao")
    return _load("torchao-int8wo")


def _unique_nbytes(tensors) -> int:
    """Independent count: tensors are whole, separate storages here, so data_ptr identifies them."""
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values())


def test_fp32_counted_bytes_are_the_unique_state_dict_plus_buffers(fp32_model):
    weights = count_weight_bytes(fp32_model)
    tensors = list(fp32_model.state_dict().values()) + list(fp32_model.buffers())
    assert weights.counted_bytes == _unique_nbytes(tensors)
    # tied embeddings (lm_head shares embed_tokens) are counted once
    assert fp32_model.lm_head.weight.data_ptr() == fp32_model.model.embed_tokens.weight.data_ptr()
    assert weights.counted_bytes < sum(t.nbytes for t in fp32_model.state_dict().values())
    assert weights.parameters == sum(p.numel() for p in fp32_model.parameters())
    assert weights.bits_per_parameter == pytest.approx(32, rel=1e-3)
    assert weights.footprint_agrees and weights.note is None


def test_nf4_double_quant_counts_packed_weights_and_quant_state(nf4_model, fp32_model):
    weights = count_weight_bytes(nf4_model)
    reference = count_weight_bytes(fp32_model)
    assert weights.counted_bytes <= 0.75 * reference.counted_bytes
    tensors = list(nf4_model.buffers())
    packed = 0
    for parameter in nf4_model.parameters():
        tensors.append(parameter)
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            packed += 1
            assert state.nested, "double quantization should nest a second quant state"
            tensors += [state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert packed > 0
    assert weights.counted_bytes == _unique_nbytes(tensors)
    # the float model's parameter count, not the packed uint8 element count
    assert weights.parameters == reference.parameters
    assert weights.bits_per_parameter < 0.75 * 32


def test_torchao_int8_footprint_misreports_and_counted_bytes_are_smaller(int8wo_model, fp32_model):
    weights = count_weight_bytes(int8wo_model)
    assert weights.footprint_bytes is not None
    assert weights.counted_bytes < weights.footprint_bytes  # the known misreport: fp32 size for int8 weights
    assert weights.footprint_bytes == count_weight_bytes(fp32_model).counted_bytes
    assert not weights.footprint_agrees and "tensor-subclass" in weights.note
    tensors = list(int8wo_model.buffers())
    for parameter in int8wo_model.parameters():
        if hasattr(parameter, "qdata"):
            tensors += [t for t in (parameter.qdata, parameter.scale, parameter.zero_point) if t is not None]
        else:
            tensors.append(parameter)
    assert weights.counted_bytes == _unique_nbytes(tensors)
    assert weights.parameters == count_weight_bytes(fp32_model).parameters


def test_peak_tracker_sees_an_allocation_and_resets_between_phases():
    size = 200 * 2**20
    with PeakMemoryTracker("cpu") as tracker:
        with tracker.phase("baseline") as baseline:
            pass
        with tracker.phase("allocate") as allocate:
            block = torch.ones(size // 4)
            del block
        with tracker.phase("after") as after:
            pass
    assert tracker.method == "rss-sampled-5ms"
    assert allocate.peak_bytes - baseline.peak_bytes > 0.75 * size
    assert after.peak_bytes < allocate.peak_bytes - 0.5 * size


def hf_cost(settings: CostSettings, method: str = "none"):
    """The cost scenario on the transformers backend, as a cost job runs it (a fresh load every call)."""
    spec = ModelSpec(name=method, role="variant", backend="hf", method=method, weights=str(builtin_model_dir()))
    job = JobSpec(
        kind="cost", run_dir="unused", model=spec, device="cpu", dtype="float32", threads=1, seed=0, batch_size=1
    )
    return measure_cost(HFBackend(job), TEXTS, settings)


def small_settings(**fields) -> CostSettings:
    return CostSettings(generation_prompts=1, generation_new_tokens=2, threads=1, **fields)


def test_latency_sweep_returns_ordered_positive_statistics():
    settings = small_settings(
        batch_sizes=(1, 2), seq_len=8, warmup=1, min_iterations=3, max_iterations=6, time_budget_s=2.0
    )
    points = hf_cost(settings).latency
    assert [p.batch_size for p in points] == [1, 2]
    for point in points:
        assert point.status == "ok" and point.seq_len == 8
        assert 3 <= point.iterations <= 6
        assert point.median_s > 0
        assert point.p10_s <= point.median_s <= point.p90_s
        assert point.tokens_per_s == pytest.approx(point.batch_size * 8 / point.median_s)
        assert point.peak_memory_bytes > 0 and point.cv is not None
        assert len(point.times_s) == point.iterations and point.median_s == pytest.approx(
            float(np.median(point.times_s))
        )


def test_memory_cap_turns_a_large_batch_into_oom_and_skips_larger_ones():
    fast = {"seq_len": 32, "warmup": 0, "min_iterations": 1, "max_iterations": 1}
    uncapped = hf_cost(small_settings(batch_sizes=(1, 32), **fast)).latency
    small, large = (p.peak_memory_bytes for p in uncapped)
    # logits alone are 32 x 32 x 49152 floats = 192 MiB at batch 32
    assert large - small > 100 * 2**20
    cap = (small + large) // 2
    capped = hf_cost(small_settings(batch_sizes=(1, 32, 64), max_memory_bytes=cap, **fast)).latency
    assert [p.status for p in capped] == ["ok", "oom", "skipped"]
    assert capped[0].median_s > 0
    assert "exceeded the memory cap" in capped[1].error
    assert capped[1].peak_memory_bytes > cap


def test_generation_produces_exactly_new_tokens_and_positive_rates(fp32_model, tokenizer):
    cost = measure_generation(fp32_model, tokenizer, TEXTS, prompts=2, new_tokens=5)
    assert cost.prompts == 2 and cost.new_tokens == 5
    assert cost.decode_tokens_per_s > 0 and cost.tokens_per_s > 0
    assert cost.prefill_s > 0 and cost.time_to_first_token_s > 0
    # the decode rate's interval resamples these: per timed prompt batch, decoding seconds and tokens
    assert sum(cost.decode_tokens) == 2 * 4 and len(cost.decode_times_s) == len(cost.decode_tokens)
    assert cost.decode_tokens_per_s == pytest.approx(sum(cost.decode_tokens) / sum(cost.decode_times_s))
    # batched, left-padded prompts of different lengths still get exactly 5 new tokens each
    (inputs,) = prompt_batches(tokenizer, TEXTS, 3, 3, None, fp32_model.device)
    with neutral_generation_defaults(fp32_model), torch.no_grad():
        output = fp32_model.generate(**inputs, generation_config=fixed_length_config(tokenizer, 5))
    assert output.shape == (3, inputs["input_ids"].shape[1] + 5)


def test_model_generation_defaults_do_not_leak_into_greedy_generation(fp32_model, tokenizer):
    (inputs,) = prompt_batches(tokenizer, TEXTS, 1, 1, None, fp32_model.device)
    config = fixed_length_config(tokenizer, 6)

    def generate() -> list[int]:
        with neutral_generation_defaults(fp32_model), torch.no_grad():
            return fp32_model.generate(**inputs, generation_config=config)[0].tolist()

    clean = generate()
    saved = fp32_model.generation_config
    polluted = saved.__class__(**saved.to_dict())
    polluted.no_repeat_ngram_size = 1
    polluted.suppress_tokens = list(dict.fromkeys(clean[inputs["input_ids"].shape[1] :]))
    fp32_model.generation_config = polluted
    try:
        assert generate() == clean
    finally:
        fp32_model.generation_config = saved
    assert fp32_model.generation_config is saved


def test_measure_cost_tracks_every_phase():
    rss_before = psutil.Process().memory_info().rss
    settings = small_settings(batch_sizes=(1, 2), seq_len=8, warmup=0, min_iterations=2, max_iterations=2)
    settings = settings.model_copy(update={"generation_new_tokens": 3})
    torch.set_num_threads(2)
    cost = hf_cost(settings)
    assert torch.get_num_threads() == 1
    assert cost.memory_method == "rss-sampled-5ms" and cost.threads == 1
    assert cost.engine == "transformers" and cost.latency_method == HFBackend.latency_method
    assert cost.load_time_s > 0
    # read after a forward touched every memory-mapped weight: the weights became resident
    assert cost.load_peak_memory_bytes - rss_before > 0.9 * cost.weights.counted_bytes
    assert [p.status for p in cost.latency] == ["ok", "ok"]
    assert cost.generation is not None and cost.generation.new_tokens == 3
    assert cost.generation.peak_memory_bytes > 0


def test_cpu_defaults_are_smaller_than_cuda_defaults():
    cpu, cuda = CostSettings.for_device("cpu"), CostSettings.for_device("cuda")
    assert cuda.seq_len == 512 and cuda.batch_sizes == (1, 2, 4, 8, 16, 32)
    assert cpu.seq_len < cuda.seq_len and cpu.batch_sizes == cuda.batch_sizes
