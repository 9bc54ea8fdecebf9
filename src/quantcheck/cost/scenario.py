"""Consideration 1 for one model: load time and memory, weight bytes, latency sweep, generation.

Meant to run once per model in a fresh process, so one model's memory never inflates another's.
Every phase (load, each batch size, generation) gets its own peak.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import psutil
import torch
from pydantic import BaseModel, Field, PositiveInt, model_validator

from quantcheck.cost.latency import DEFAULT_BATCH_SIZES, batch_inputs, is_out_of_memory, latency_sweep
from quantcheck.cost.memory import PeakMemoryTracker, count_weight_bytes
from quantcheck.cost.throughput import measure_generation
from quantcheck.cost.timing import Clock
from quantcheck.schema.results import GenerationCost, ModelCost

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def default_threads() -> int:
    """Physical cores this process may use: more threads than cores makes CPU timings collapse."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or available, available))


class CostSettings(BaseModel):
    """How much cost to measure. `for_device` gives the documented defaults per device."""

    batch_sizes: tuple[PositiveInt, ...] = DEFAULT_BATCH_SIZES
    seq_len: int = Field(
        512,
        ge=1,
        description="latency inputs are padded/truncated to this many tokens; generation prompts are cut to it",
    )
    warmup: int = Field(2, ge=0)
    min_iterations: int = Field(3, ge=1)
    max_iterations: int = Field(20, ge=1)
    time_budget_s: float = Field(30.0, gt=0, description="per batch size, warm-up included")
    target_rse: float = Field(0.02, gt=0, description="stop once the mean's relative standard error is this small")
    generation_prompts: int = Field(4, ge=1)
    generation_new_tokens: int = Field(32, ge=2)
    generation_batch_size: int = Field(1, ge=1)
    max_memory_bytes: int | None = Field(
        None, gt=0, description="cap on the process's memory; batch sizes above it are 'oom'"
    )
    threads: int = Field(default_factory=default_threads, ge=1)

    @model_validator(mode="after")
    def _iterations_ordered(self) -> CostSettings:
        if self.max_iterations < self.min_iterations:
            raise ValueError(f"max_iterations ({self.max_iterations}) is below min_iterations ({self.min_iterations})")
        return self

    @classmethod
    def for_device(cls, device: str) -> CostSettings:
        """CUDA: the original experiment's 512 tokens, up to 20 iterations. CPU: about 25 s a model.

        The CPU numbers were measured on the built-in 135M model with 2 cores: batch 32 x 32 tokens
        takes 1.9 s a pass there (512 tokens would take over 30 s), and the whole default cost of
        one model took 23 s (load, sweep 1-32, two 16-token generations).
        """
        if torch.device(device).type == "cuda":
            return cls()
        return cls(
            seq_len=32,
            warmup=1,
            max_iterations=10,
            time_budget_s=3.0,
            target_rse=0.03,
            generation_prompts=2,
            generation_new_tokens=16,
        )


def measure_cost(
    load: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    settings: CostSettings,
    device: str,
    on_step: Callable[[str], None] | None = None,
) -> ModelCost:
    """Load the model with `load()` and measure everything consideration 1 reports about it.

    `on_step` hears of each finished step (load, each batch size, generation) for progress display.

    On CPU, safetensors weights are memory-mapped and only become resident when read, so the load
    phase ends with one tiny forward pass that reads the weights (of an untied embedding, only the
    looked-up rows) before its peak is taken.
    """
    step = on_step or (lambda name: None)
    torch.set_num_threads(settings.threads)
    if torch.device(device).type == "cpu" and settings.threads > 1 and "OMP_WAIT_POLICY" not in os.environ:
        logger.warning("OMP_WAIT_POLICY is not set: CPU timings collapse if anything else runs (the launcher sets it)")
    clock = Clock(device)
    with PeakMemoryTracker(device) as tracker:
        with tracker.phase("load") as load_phase:
            begin = clock.now()
            model = load()
            load_time = clock.since(begin)
            if torch.device(device).type == "cpu":
                with torch.no_grad():
                    model(**batch_inputs(tokenizer, texts, 1, 8, model.device), use_cache=False)
        step("load")
        weights = count_weight_bytes(model)
        latency = latency_sweep(
            model,
            tokenizer,
            texts,
            batch_sizes=settings.batch_sizes,
            seq_len=settings.seq_len,
            warmup=settings.warmup,
            min_iterations=settings.min_iterations,
            max_iterations=settings.max_iterations,
            time_budget_s=settings.time_budget_s,
            target_rse=settings.target_rse,
            max_memory_bytes=settings.max_memory_bytes,
            tracker=tracker,
            on_point=lambda point: step(f"batch {point.batch_size}"),
        )
        generation = _generation_or_none(model, tokenizer, texts, settings, tracker)
        step("generation")
    return ModelCost(
        memory_method=tracker.method,
        threads=settings.threads,
        load_time_s=load_time,
        load_peak_memory_bytes=load_phase.peak_bytes,
        weights=weights,
        latency=latency,
        generation=generation,
    )


def _generation_or_none(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    settings: CostSettings,
    tracker: PeakMemoryTracker,
) -> GenerationCost | None:
    """Running out of memory while generating leaves the generation figures empty, not the whole cost."""
    try:
        return measure_generation(
            model,
            tokenizer,
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
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return None
