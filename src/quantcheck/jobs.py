"""What the parent asks a worker process to do: one model, one kind of work, in a fresh process.

Like optimum-benchmark's launcher/scenario split: the parent never loads a model, so no model's
weights or allocator state can leak into another's numbers, and a crash or OOM in one worker is
recorded for that model while the run goes on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

EVENT_PREFIX = "@@quantcheck "


class GenerationOptions(BaseModel):
    chat: Literal["auto", "on", "off"] = "auto"
    temperature: float = 0.1
    greedy: bool = False
    max_new_tokens: int = 32
    batch_size: int = 16


class JobSpec(BaseModel):
    kind: Literal["quality", "cost"]
    run_dir: str
    model_name: str  # "reference" or the variant's method name
    method: str  # registry name; the reference is built with "none"
    model_path: str
    device: str
    dtype: str
    threads: int
    seed: int
    batch_size: int
    trust_remote_code: bool = False
    allow_offload: bool = False
    allow_pickle: bool = False
    loglik: bool = True
    generation: GenerationOptions | None = None
    cost: dict[str, object] | None = None  # CostSettings fields
