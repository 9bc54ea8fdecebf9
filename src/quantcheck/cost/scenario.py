"""Consideration 1 for one model, as one scenario for every engine: load time and memory, weight bytes, the
latency sweep, generation (`measure_cost`); an engine offers the few primitives of `CostTarget`.

Meant to run once per model in a fresh process, so one model's memory never inflates another's.
Every phase (load, each batch size, generation) gets its own peak.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch
from pydantic import BaseModel, Field, PositiveInt, model_validator

from quantcheck.cost.latency import (
    DEFAULT_BATCH_SIZES,
    Repeats,
    check_cpu_cap,
    cuda_memory_cap,
    repeat_timed,
    sweep_batch_sizes,
)
from quantcheck.cost.memory import PeakMemoryTracker
from quantcheck.cost.timing import Clock
from quantcheck.schema.results import GenerationCost, ModelCost, WeightMemory


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


@dataclass(frozen=True)
class MemoryScope:
    """Where one engine's cost is read: the device whose memory and clock count, whether the engine's own
    subprocesses count too, and what the tracker cannot see (several GPUs)."""

    device: str
    clock_device: str
    process_tree: bool = False
    memory_method: str | None = None
    """Replaces the tracker's own method name where the figure leaves something out."""
    caps_torch_allocator: bool = False
    """`max_memory_bytes` also caps torch's CUDA allocator (an engine that runs its model through torch in this
    process); elsewhere the cap is the CPU's resident memory only."""


class CostTarget(Protocol):
    """The few primitives the cost scenario asks of an engine (optimum-benchmark's backend/scenario split): the
    scenario owns the order, the memory phases, the repeats and the statistics; the engine only loads, counts its
    weights, makes one latency call ready and decodes."""

    cost_engine: str
    latency_method: str

    def memory_scope(self) -> MemoryScope: ...

    def prepare_cost(self, texts: Sequence[str], settings: CostSettings) -> None:
        """Work before any timing or memory phase: a GGUF built, prompt ids made, threads set."""

    def load_for_cost(self, texts: Sequence[str]) -> None:
        """Load until the model answers, with its weights resident: this is the load time and the load peak."""

    def weight_memory(self) -> WeightMemory: ...

    def latency_call(self, batch_size: int, seq_len: int, texts: Sequence[str]) -> Callable[[], object]:
        """One timed latency iteration at `batch_size`, its inputs made outside the timing."""

    def generation_cost(
        self, texts: Sequence[str], settings: CostSettings, tracker: PeakMemoryTracker, clock: Clock
    ) -> GenerationCost | None:
        """Fixed-length decoding, in the tracker's memory phases; None where it ran out of memory."""


def measure_cost(
    target: CostTarget,
    texts: Sequence[str],
    settings: CostSettings | dict[str, object],
    on_step: Callable[[str], None] | None = None,
) -> ModelCost:
    """One model's cost, the same way for every engine: load (timed, with its own peak), the weights counted, the
    latency sweep (repeats until the median is stable, a memory phase and the CPU others took for each batch size,
    an out-of-memory a result), then fixed-length generation.

    `on_step` hears of each finished step (load, each batch size, generation) for progress display.
    """
    settings = CostSettings.model_validate(settings)
    step = on_step or (lambda name: None)
    scope = target.memory_scope()
    target.prepare_cost(texts, settings)
    clock, device = Clock(scope.clock_device), torch.device(scope.device)
    with PeakMemoryTracker(scope.device, process_tree=scope.process_tree) as tracker:
        with tracker.phase("load") as load_phase:
            begin = clock.now()
            target.load_for_cost(texts)
            load_time = clock.since(begin)
        step("load")
        weights = target.weight_memory()
        repeats = Repeats.of(settings)

        def time_batch(batch_size: int, tracker: PeakMemoryTracker) -> list[float]:
            call = target.latency_call(batch_size, settings.seq_len, texts)
            within_cap = lambda: check_cpu_cap(device, settings.max_memory_bytes, tracker)  # while the output lives
            return repeat_timed(call, clock, repeats, within_cap)

        cap = settings.max_memory_bytes if scope.caps_torch_allocator else None
        with cuda_memory_cap(device, cap), torch.no_grad():
            latency = sweep_batch_sizes(
                time_batch,
                settings.batch_sizes,
                settings.seq_len,
                scope.device,
                tracker,
                on_point=lambda point: step(f"batch {point.batch_size}"),
            )
            generation = target.generation_cost(texts, settings, tracker, clock)
        step("generation")
    return ModelCost(
        memory_method=scope.memory_method or tracker.method,
        threads=settings.threads,
        engine=target.cost_engine,
        latency_method=target.latency_method,
        load_time_s=load_time,
        load_peak_memory_bytes=load_phase.peak_bytes,
        weights=weights,
        latency=latency,
        generation=generation,
    )
