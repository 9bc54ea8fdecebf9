"""The transformers backend: the reference and every registered recipe, in this process, on one device.

The numbers are those quantcheck measured before the seam existed: the same left-padded batches,
the same forward with only the last position's logits, the same cost measurement.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.errors import QuantcheckError
from quantcheck.models.plan import Footprint
from quantcheck.models.quant_methods import (
    MIXED_OPTION,
    REGISTRY,
    LoadRequest,
    QuantMethod,
    mixed_method,
    parse_keep,
    split_mixed,
)
from quantcheck.schema.results import EngineInfo, WeightPlan

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from quantcheck.cost.memory import PeakMemoryTracker
    from quantcheck.cost.scenario import CostSettings, MemoryScope
    from quantcheck.cost.timing import Clock
    from quantcheck.models.plan import ModelShape
    from quantcheck.schema.models import Calibration, ModelSpec
    from quantcheck.schema.results import GenerationCost, GenerationSettings, WeightMemory

logger = logging.getLogger(__name__)


def _keeps_last_logits_only(model) -> dict[str, int]:
    """Ask for the last position's logits only when the model supports it: saves the [batch, seq, vocab] tensor."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def answer_position_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities of the next token after each (left-padded) prompt, float32 on CPU."""
    import torch

    with torch.no_grad():  # not inference_mode: quanto int4 fails under it
        logits = model(**batch, **_keeps_last_logits_only(model)).logits[:, -1, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


class HFBackend(Backend):
    """transformers in the worker's process. torch is imported where a model runs: the parent imports this module
    only to parse and check variant names, which then fail in about a second instead of after torch's import."""

    name = "hf"
    engine_package = "transformers"
    install_hint = "pip install transformers"
    scores_text = True
    variant_options = {
        MIXED_OPTION: "decoder layers left at the reference's precision, by index (keep=0,1,29): "
        "a mixed-precision variant, as `quantcheck sensitivity` proposes"
    }

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return {
            name: MethodInfo(m.name, m.description, m.devices, m.requires, m.install, m.footprint)
            for name, m in REGISTRY.items()
        }

    @classmethod
    def parse_variant(
        cls, body: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec | None:
        """`METHOD?keep=0,1,29`: the method with those decoder layers left out, checked against the model's layer
        count; its name (and method) is that spelling with the indices sorted."""
        if MIXED_OPTION not in options:
            return None
        from quantcheck.models.loading import decoder_layer_count
        from quantcheck.schema.models import ModelSpec

        if body.startswith("pretrained:"):
            raise QuantcheckError(
                f"{body} was quantized elsewhere and cannot keep layers: {MIXED_OPTION}= takes a method of "
                "`quantcheck quants`"
            )
        REGISTRY[cls.method_info(body).name].check_keeps()  # an unknown method lists the valid ones
        keep = parse_keep(options[MIXED_OPTION], decoder_layer_count(reference_weights))
        name = mixed_method(body, keep)
        return ModelSpec(name=name, role="variant", backend=cls.name, method=name, weights=reference_weights)

    @classmethod
    def plan_made(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """transformers reads a compressed-tensors checkpoint by decompressing it: the reference's precision."""
        return WeightPlan(
            bytes=shape.weight_bytes(Footprint(bits=0), dtype_bytes),
            basis="decompressed by transformers to the reference's precision (serve it in vLLM to save memory)",
        )

    @classmethod
    def describe_method(cls, method: str) -> str:
        name, keep = split_mixed(method)
        kept = f", decoder layers {', '.join(map(str, keep))} kept at the reference's precision" if keep else ""
        return cls.method_info(name).description + kept

    @classmethod
    def plan_weights(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """A mixed-precision variant: its method's plan with the kept layers at the reference's precision."""
        method, keep = split_mixed(spec.method)
        if spec.checkpoint or not keep:
            return super().plan_weights(spec, shape, dtype_bytes)
        footprint = REGISTRY[method].footprint
        planned = shape.weight_bytes(footprint, dtype_bytes, kept_layers=len(keep)) if footprint else None
        return WeightPlan(bytes=planned, basis=f"{footprint.describe() if footprint else method}, {len(keep)} kept")

    @classmethod
    def check(cls, spec: ModelSpec, device: str, settings: BaseModel | None) -> None:
        _recipe(spec).check_runnable(device)

    def __init__(self, job) -> None:
        super().__init__(job)
        import torch

        from quantcheck.models.loading import kept_modules, load_tokenizer

        self.method = _recipe(self.spec)
        keep = () if self.spec.checkpoint else split_mixed(self.spec.method)[1]
        self.request = LoadRequest(
            path=self.spec.weights,
            device=job.device,
            dtype=getattr(torch, job.dtype),
            trust_remote_code=job.trust_remote_code,
            allow_offload=job.allow_offload,
            device_memory_bytes=job.device_memory_bytes,
            offload_folder=self._offload_folder(job),
            allow_pickle=job.allow_pickle,
            keep=kept_modules(self.spec.weights, keep, job.trust_remote_code) if keep else (),
        )
        self.tokenizer = load_tokenizer(self.spec.weights, job.trust_remote_code)
        self.model = None

    def _offload_folder(self, job) -> str | None:
        """Where accelerate writes what neither the device nor the host can hold: beside the model's records (on the
        run's disk, which the user chose); what a killed worker left there is dropped first."""
        if not job.allow_offload:
            return None
        import shutil

        from quantcheck.storage.folder import RunFolder

        folder = RunFolder(Path(job.run_dir)).offload_dir(self.spec.folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return str(folder)

    def _build(self):
        from quantcheck.models.loading import load_model

        return load_model(self.method, self.request)

    def load(self) -> None:
        self.model = self._build()

    def describe(self) -> EngineInfo:
        import transformers

        from quantcheck.models.loading import precision_info

        precision = precision_info(self.model, self.method.compute_dtype(self.request))
        return EngineInfo(
            engine="transformers",
            version=transformers.__version__,
            compute_dtype=precision.compute_dtype,
            devices=precision.devices,
            parallel={},
            precision=precision,
        )

    @property
    def vocab_width(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        from quantcheck.data.batching import left_padded

        batch = left_padded([list(ids) for ids in prompts], self.tokenizer.pad_token_id, self.job.device)
        return answer_position_logprobs(self.model, batch).numpy()

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        """One forward over the equal-length windows (no padding), keeping only the scored positions' logits."""
        import torch

        ids = torch.tensor([list(window) for window in windows], device=self.job.device)
        width = ids.shape[1] - first
        keep = {"logits_to_keep": width} if _keeps_last_logits_only(self.model) else {}
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **keep).logits[:, -width:-1, :]
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        """One batch through `generate`, seeded per batch with `seeds[0]`; new ids cut at the first stop token."""
        import torch

        from quantcheck.backends.hf.generation import explicit_generation_config, neutral_generation_defaults
        from quantcheck.cost.timing import Clock
        from quantcheck.data.batching import left_padded

        config = explicit_generation_config(
            self.tokenizer,
            do_sample=not settings.greedy,
            temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens,
            stop_token_ids=settings.stop_token_ids,
        )
        batch = left_padded([list(ids) for ids in prompts], self.tokenizer.pad_token_id, self.job.device)
        batch.pop("position_ids")  # generate() derives them from the attention mask
        torch.manual_seed(seeds[0])
        clock = Clock(self.job.device)
        with neutral_generation_defaults(self.model), torch.no_grad():
            output = self.model.generate(**batch, generation_config=config)
        clock.now()  # waits for queued device work before the ids are read
        stops = set(settings.stop_token_ids) | {self.tokenizer.pad_token_id}
        new_ids = []
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            length = next((index for index, token in enumerate(row) if token in stops), len(row))
            new_ids.append(row[:length])
        return new_ids

    # --- cost primitives (cost/scenario.py) ----------------------------------------------------------------
    cost_engine = "transformers"
    latency_method = "one forward pass over the whole batch (logits, no KV cache)"

    def memory_scope(self) -> MemoryScope:
        from quantcheck.cost.scenario import MemoryScope

        return MemoryScope(self.job.device, self.job.device, caps_torch_allocator=True)

    def prepare_cost(self, texts: Sequence[str], settings: CostSettings) -> None:
        import torch

        torch.set_num_threads(settings.threads)
        if self.job.device == "cpu" and settings.threads > 1 and "OMP_WAIT_POLICY" not in os.environ:
            logger.warning(
                "OMP_WAIT_POLICY is not set: CPU timings collapse if anything else runs (the launcher sets it)"
            )

    def load_for_cost(self, texts: Sequence[str]) -> None:
        """On CPU, safetensors weights are memory-mapped and only become resident when read, so loading ends with one
        tiny forward pass that reads them (of an untied embedding, only the looked-up rows)."""
        import torch

        from quantcheck.backends.hf.generation import batch_inputs

        self.load()
        if self.model.device.type == "cpu":
            with torch.no_grad():
                self.model(**batch_inputs(self.tokenizer, texts, 1, 8, self.model.device), use_cache=False)

    def weight_memory(self) -> WeightMemory:
        from quantcheck.cost.memory import count_weight_bytes

        return count_weight_bytes(self.model)

    def latency_call(self, batch_size: int, seq_len: int, texts: Sequence[str]) -> Callable[[], object]:
        from quantcheck.backends.hf.generation import batch_inputs

        inputs = batch_inputs(self.tokenizer, texts, batch_size, seq_len, self.model.device)
        return lambda: self.model(**inputs, use_cache=False)

    def generation_cost(
        self, texts: Sequence[str], settings: CostSettings, tracker: PeakMemoryTracker, clock: Clock
    ) -> GenerationCost | None:
        """Running out of memory while generating leaves the generation figures empty, not the whole cost."""
        import torch

        from quantcheck.backends.hf.generation import measure_generation
        from quantcheck.cost.latency import is_out_of_memory

        try:
            return measure_generation(
                self.model,
                self.tokenizer,
                texts,
                prompts=settings.generation_prompts,
                new_tokens=settings.generation_new_tokens,
                batch_size=settings.generation_batch_size,
                max_prompt_tokens=settings.seq_len,
                tracker=tracker,
            )
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            logger.warning("generation ran out of memory: %s", str(error).splitlines()[0] if str(error) else error)
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _recipe(spec: ModelSpec) -> QuantMethod:
    """The registry's recipe (of a mixed variant: its method's); a pre-quantized checkpoint loads as saved (the `none`
    recipe on its own folder)."""
    if spec.checkpoint:
        return REGISTRY["none"]
    method = split_mixed(spec.method)[0]
    if method not in REGISTRY:
        HFBackend.method_info(method)  # raises with the valid names
    return REGISTRY[method]


BACKEND = HFBackend
__all__ = ["BACKEND", "HFBackend", "answer_position_logprobs"]
