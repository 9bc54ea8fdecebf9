"""What the parent asks a worker process to do (one model, one kind of work, in a fresh process), as the JSON file the
worker reads, and the events it prints back.

Like optimum-benchmark's launcher/scenario split: the parent never loads a model, so no model's
weights or allocator state can leak into another's numbers, and a crash or OOM in one worker is
recorded for that model while the run goes on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from quantcheck.schema.models import CorpusJob, GenerationOptions, ModelSpec

EVENT_PREFIX = "@@quantcheck "
"""Starts each line a worker prints for the parent (one JSON event); every other line is the engine's own output."""


class EngineSettings(BaseModel):
    """Settings passed through to a serving engine: today only vLLM reads them; the other engines ignore them."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int = Field(2048, ge=16)
    enforce_eager: bool = True
    cpu_kv_cache_bytes: int = Field(
        1 << 30,
        gt=0,
        description="KV cache reserved by vLLM on CPU (its default asks for more than most machines have)",
    )


class JobSpec(BaseModel):
    kind: Literal["quality", "cost"]
    run_dir: str
    model: ModelSpec
    device: str
    dtype: str
    threads: int
    seed: int
    batch_size: int
    engine: EngineSettings = EngineSettings()
    trust_remote_code: bool = False
    allow_offload: bool = False
    device_memory_bytes: int | None = None  # allow_offload: the device's share (--max-memory-gb); the rest offloads
    allow_pickle: bool = False
    loglik: bool = True
    generation: GenerationOptions | None = None
    corpus: CorpusJob | None = None  # set: score the run's text corpus instead of questions
    own_answers: bool = False  # prompts: a variant also answers every prompt greedily itself
    engine_floor: bool = False  # set: also score a bounded subset twice with two batch plans (scoring/engine_floor.py)
    cost: dict[str, object] | None = None  # CostSettings fields
    cost_round: int = 1
