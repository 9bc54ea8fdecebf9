"""The transformers backend: the reference and every registered recipe, in this process, on one device.

The numbers are those quantcheck measured before the seam existed: the same left-padded batches,
the same forward with only the last position's logits, the same cost measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.models.quant_methods import REGISTRY, LoadRequest, QuantMethod
from quantcheck.schema.results import EngineInfo

if TYPE_CHECKING:
    import torch

    from quantcheck.schema.jobs import EngineSettings
    from quantcheck.schema.models import ModelSpec
    from quantcheck.schema.results import GenerationSettings, ModelCost


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

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return {
            name: MethodInfo(m.name, m.description, m.devices, m.requires, m.install) for name, m in REGISTRY.items()
        }

    @classmethod
    def check(cls, spec: ModelSpec, device: str, engine: EngineSettings) -> None:
        _recipe(spec).check_runnable(device)

    def __init__(self, job) -> None:
        super().__init__(job)
        import torch

        from quantcheck.models.loading import load_tokenizer

        self.method = _recipe(self.spec)
        self.request = LoadRequest(
            path=self.spec.weights,
            device=job.device,
            dtype=getattr(torch, job.dtype),
            trust_remote_code=job.trust_remote_code,
            allow_offload=job.allow_offload,
            allow_pickle=job.allow_pickle,
        )
        self.tokenizer = load_tokenizer(self.spec.weights, job.trust_remote_code)
        self.model = None

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

        from quantcheck.cost.throughput import explicit_generation_config, neutral_generation_defaults
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

    def measure_cost(self, texts: Sequence[str], settings: object, on_step: Callable[[str], None]) -> ModelCost:
        from quantcheck.cost.scenario import measure_cost

        return measure_cost(self._build, self.tokenizer, texts, settings, self.job.device, on_step=on_step)


def _recipe(spec: ModelSpec) -> QuantMethod:
    """The registry's recipe; a pre-quantized checkpoint loads as saved (the `none` recipe on its own folder)."""
    if spec.checkpoint:
        return REGISTRY["none"]
    if spec.method not in REGISTRY:
        HFBackend.method_info(spec.method)  # raises with the valid names
    return REGISTRY[spec.method]


BACKEND = HFBackend
__all__ = ["BACKEND", "HFBackend", "answer_position_logprobs"]
