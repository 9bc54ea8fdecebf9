"""The backend seam: what an engine that runs one model must answer, as a few request kinds.

In the spirit of lm-eval's `LM` class, nothing above this seam holds an engine object. Scoring,
answer parsing, the reference store, statistics and the report see only these requests:

- `next_token_logprobs(prompts)`: log-probabilities of the next token after each token-id prompt,
  over the full vocabulary (the rows KL, Jaccard@k, top-1 and the log-likelihood answer come from),
  or only their top K where a server caps them (`top_logprobs`);
- `window_logprobs(windows, first)`: the same rows at every position of equal-length token windows
  from `first` on (a text corpus scored llama-perplexity-style), where the engine can (`scores_text`);
- `generate(prompts, settings, seeds)`: new token ids per prompt under one explicit settings object;
- `measure_cost(texts, settings, on_step)`: its cost, by the one cost scenario (`cost/scenario.py`) through a
  few primitives (`memory_scope`, `load_for_cost`, `weight_memory`, `latency_call`, `generation_cost`);
- `describe()`: engine and version, precision, devices, parallel layout.

Prompts are always token ids made by the reference's tokenizer in the worker, never text an engine
re-tokenizes: every model sees identical ids (llama.cpp's two-pass protocol). A backend is one
module in this package with one `Backend` subclass and its table of quantization methods; the
registry in `quantcheck.backends` names it.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from quantcheck.errors import QuantcheckError, QuantMethodError
from quantcheck.models.plan import Footprint, ModelShape, checkpoint_footprint, read_config
from quantcheck.models.quant_methods import importable
from quantcheck.schema.results import WeightPlan

if TYPE_CHECKING:
    import numpy as np
    from pydantic import BaseModel

    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import Calibration, MakeSettings, ModelSpec
    from quantcheck.schema.results import EngineInfo, GenerationSettings, ModelCost


@dataclass(frozen=True)
class MethodInfo:
    """A quantization method as every backend lists it: for `quantcheck quants` and the checks before loading."""

    name: str
    description: str
    devices: frozenset[str]
    requires: tuple[str, ...] = ()  # importable module names, in the interpreter the backend runs under
    install: str = ""
    footprint: Footprint | None = None
    """How it stores the weights, for the plan made before loading (`models.plan`); None: not planned."""

    def missing_requirements(self) -> list[str]:
        return [module for module in self.requires if not importable(module)]

    def check_runnable(self, device: str, backend: str) -> None:
        """Refuse before any model loads: a method that does not run on this device."""
        if device not in self.devices:
            label = self.name if backend == "hf" else f"{backend}:{self.name}"
            raise QuantMethodError(
                f"{label} does not run on {device} (runs on: {', '.join(sorted(self.devices))}); "
                "choose another --quant or --device"
            )


class Backend(ABC):
    """One model inside one engine, owned by one worker process."""

    name: ClassVar[str]
    engine_package: ClassVar[str]  # the importable module the engine needs
    install_hint: ClassVar[str]
    quant_syntax: ClassVar[str] = ""  # set by a backend whose models are named by address, not by a method table
    scores_text: ClassVar[bool] = False  # answers `window_logprobs` (text corpora)
    variant_options: ClassVar[dict[str, str]] = {}
    """The `?key=value` options this engine's variants take (`backends.variants.GRAMMAR`), each with what it means."""
    settings_model: ClassVar[type[BaseModel] | None] = None
    """The engine's own settings: the `[engine.NAME]` table of a config file, its `run` options, `self.settings`."""

    def __init__(self, job: JobSpec) -> None:
        self.job = job
        self.spec: ModelSpec = job.model
        self.settings = self.engine_settings(job.engine)

    @classmethod
    def engine_settings(cls, engines: Mapping[str, Mapping[str, object]]) -> BaseModel | None:
        """This engine's table of `engines` (validated by the run's config already), defaults for what it leaves
        out; None for an engine without settings."""
        return cls.settings_model.model_validate(engines.get(cls.name, {})) if cls.settings_model else None

    @classmethod
    def context_limit(cls, settings: BaseModel | None) -> tuple[int, str, str] | None:
        """The longest sequence the engine is set up for, what holds it and the option that sets it (2048, "vLLM plans
        for", "--max-model-len"); None where only the model's own limit applies."""
        return None

    # --- checks in the parent, before anything loads ---------------------------------------
    @classmethod
    @abstractmethod
    def methods(cls) -> dict[str, MethodInfo]:
        """The quantization methods this engine can build from the reference's weights."""

    @classmethod
    def method_info(cls, method: str) -> MethodInfo:
        """Look a method up; an unknown name lists the valid ones."""
        methods = cls.methods()
        if method in methods:
            return methods[method]
        prefix, engine = ("", "") if cls.name == "hf" else (f"{cls.name}:", f"{cls.name} ")
        valid = ", ".join(prefix + name for name in methods)
        raise QuantMethodError(
            f"unknown {engine}quantization method {method!r}; valid: {valid}, or {prefix}pretrained:<folder>"
        )

    @classmethod
    def check_text(cls, spec: ModelSpec) -> None:
        """Before any work in a text or prompts run: refuse in one line where this model cannot score every token."""
        if not cls.scores_text:
            raise QuantcheckError(
                f"{spec.name} runs in the {cls.name} backend, which cannot score every token of a text or of answers "
                "(--dataset text:... or prompts:...): compare it on questions (mmlu:...), or use the hf, vllm or "
                "llamacpp backend"
            )

    @classmethod
    def describe_method(cls, method: str) -> str:
        """A variant's method in words (results.json's `description`), its `?key=value` options included."""
        return f"{cls.method_info(method).description} [{cls.name}]"

    @classmethod
    def parse_variant(
        cls, body: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec | None:
        """A variant written in this engine's own syntax (llama.cpp: `gguf:FILE.gguf`); None for METHOD and
        pretrained:PATH. `options` are known to be among `variant_options`."""
        return None

    @classmethod
    def checkpoint_row(cls) -> tuple[str, str]:
        """How `quantcheck quants` shows a checkpoint quantized elsewhere: syntax without the prefix, description."""
        return "pretrained:PATH", f"a pre-quantized checkpoint (AWQ, GPTQ, bnb, fp8...) loaded by {cls.name}"

    @classmethod
    def made_row(cls) -> tuple[str, str] | None:
        """How `quantcheck quants` shows a calibrated variant this engine makes itself (beyond llm-compressor's)."""
        return None

    @classmethod
    def interpreter(cls) -> str:
        """The Python that runs this backend's workers: this one, when the engine is importable here."""
        if not importable(cls.engine_package):
            raise QuantMethodError(
                f"the {cls.name} backend needs {cls.engine_package}, which is not installed: {cls.install_hint}"
            )
        return sys.executable

    @classmethod
    def make_checkpoint(cls, spec: ModelSpec, log: Path, making: MakeSettings) -> tuple[dict, bool]:
        """Make the checkpoint `spec.make` asks for into `spec.weights` (llm-compressor's, read by hf and vllm): what
        its making recorded (seconds, versions) and whether the cache held it already."""
        from quantcheck.models import calibrated

        _, made, cached = calibrated.make(calibrated.MakeRequest.of(spec.make, spec.tokenizer), log, making)
        return made, cached

    @classmethod
    def describe_made(cls, spec: ModelSpec) -> str:
        """A checkpoint quantcheck makes, in words (results.json's `description`)."""
        from quantcheck.models.calibrated import RECIPES

        made, make = RECIPES[spec.make.recipe], spec.make
        calibration = f", calibrated on {make.calibration} ({make.samples} x {make.seq_len} tokens)"
        return f"{made.description}{calibration if made.calibrated else ''}, made here, read by {spec.backend}"

    @classmethod
    def plan_made(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """A checkpoint quantcheck makes (llmc:RECIPE), as this engine holds it: by the recipe's footprint."""
        from quantcheck.models.calibrated import RECIPES

        footprint = RECIPES[spec.make.recipe].footprint
        planned = shape.weight_bytes(footprint, dtype_bytes)
        return WeightPlan(bytes=planned, basis=f"{spec.make.recipe}, {footprint.describe()}")

    @classmethod
    def plan_weights(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """The model's weight bytes planned from its config.json (an estimate), or why there is no plan: a
        pre-quantized checkpoint by its `quantization_config`, a method by its footprint."""
        if spec.make is not None:
            return cls.plan_made(spec, shape, dtype_bytes)
        if spec.checkpoint:
            config = read_config(Path(spec.weights))
            footprint = checkpoint_footprint(config) if config else None
            if footprint is None:
                return WeightPlan(bytes=None, basis="a checkpoint whose quantization_config this plan does not know")
            planned = ModelShape.from_config(config).weight_bytes(footprint, dtype_bytes)
            return WeightPlan(bytes=planned, basis=f"its {config['quantization_config']['quant_method']} config")
        footprint = cls.method_info(spec.method).footprint
        if footprint is None:
            return WeightPlan(bytes=None, basis=f"{cls.name}:{spec.method} has no weight plan")
        return WeightPlan(bytes=shape.weight_bytes(footprint, dtype_bytes), basis=footprint.describe())

    @classmethod
    def check(cls, spec: ModelSpec, device: str, settings: BaseModel | None) -> None:
        """Everything about `spec` that can be refused before a model loads (`settings`: `engine_settings`)."""
        if not spec.checkpoint:
            cls.method_info(spec.method).check_runnable(device, cls.name)

    # --- requests, in the worker ---------------------------------------------------------------
    @abstractmethod
    def load(self) -> None:
        """Build the model (quantizing it where the method does so at load time)."""

    @abstractmethod
    def describe(self) -> EngineInfo:
        """What actually runs: engine, version, precision, devices, parallel layout."""

    tokenizer_verified: bool | None = None
    """After `tokenizer_mismatch`: True where the engine's own tokenizer was shown to agree, False where it
    disagrees or could not be asked (`tokenizer_note` then says why); None where it does not apply."""
    tokenizer_note: str | None = None

    def tokenizer_mismatch(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> str | None:
        """Where the engine tokenizes by itself, whether it agrees with the ids quantcheck made for `texts`:
        a description of the first disagreement, or None. Local engines run on quantcheck's own ids."""
        return None

    @property
    @abstractmethod
    def vocab_width(self) -> int:
        """Width of a log-probability row (the output layer's size, which can exceed the tokenizer's)."""

    @abstractmethod
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [len(prompts), vocab_width]: log-softmax of the next-token logits after each prompt."""

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        """float32 [len(windows), len(window) - first - 1, vocab_width]: log-softmax of the logits at positions
        first .. len-2 of each window (they predict tokens first+1 .. len-1). Only where `scores_text`."""
        raise NotImplementedError(f"the {self.name} backend does not score text corpora")

    def recorded_windows(self) -> list[list[int]] | None:
        """The token windows a recorded reference brings with it (a llama-perplexity base file); None: the text is cut
        here."""
        return None

    @property
    def top_logprobs(self) -> int | None:
        """None when `next_token_logprobs` rows are full; K when only each row's top K entries are known
        (-inf elsewhere), as from a server that caps log-probabilities: KL then becomes a lower bound."""
        return None

    @abstractmethod
    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        """New token ids per prompt (stop token excluded), decoded under exactly `settings`.

        `seeds[i]` seeds prompt i where the engine seeds per request; engines that seed per batch
        use `seeds[0]`. Either way a resumed run reproduces the same samples.
        """

    def measure_cost(self, texts: Sequence[str], settings: object, on_step: Callable[[str], None]) -> ModelCost:
        """Load the model and measure its cost (the cost job never calls `load` first): the one cost scenario, through
        the primitives of `cost.scenario.CostTarget` that an engine in this process offers. A model behind a server
        measures what a client sees instead."""
        from quantcheck.cost.scenario import measure_cost

        return measure_cost(self, texts, settings, on_step)
