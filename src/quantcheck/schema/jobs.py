"""What the parent asks a worker process to do (one model, one kind of work, in a fresh process), as the JSON file the
worker reads, and the events it prints back.

Like optimum-benchmark's launcher/scenario split: the parent never loads a model, so no model's
weights or allocator state can leak into another's numbers, and a crash or OOM in one worker is
recorded for that model while the run goes on.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from quantcheck.schema.models import CorpusJob, GenerationOptions, ModelSpec
from quantcheck.schema.results import DatasetKind

EVENT_PREFIX = "@@quantcheck "
"""Starts each line a worker prints for the parent (one JSON event); every other line is the engine's own output."""


def emit(event: str, **fields: object) -> None:
    """One event for the parent, on the worker's stdout."""
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


EngineTables = dict[str, dict[str, object]]
"""Each engine's own settings by backend name (`[engine.vllm]`, `[engine.llamacpp]`), as the run's config validated
them; the backend reads its table (`Backend.engine_settings`)."""


class JobSpec(BaseModel):
    kind: Literal["quality", "cost"]
    run_dir: str
    model: ModelSpec
    device: str
    dtype: str
    threads: int
    seed: int
    batch_size: int
    engine: EngineTables = Field(default_factory=dict)
    trust_remote_code: bool = False
    allow_offload: bool = False
    device_memory_bytes: int | None = None  # allow_offload: the device's share (--max-memory-gb); the rest offloads
    allow_pickle: bool = False
    task: DatasetKind = "questions"  # the data set kind whose job this is (quantcheck.tasks)
    loglik: bool = True
    generation: GenerationOptions | None = None
    corpus: CorpusJob | None = None  # an every-token kind's settings (a text's windows, the prompts' answers)
    own_answers: bool = False  # prompts: a variant also answers every prompt greedily itself
    engine_floor: bool = False  # set: also score a bounded subset twice with two batch plans (scoring/engine_floor.py)
    cost: dict[str, object] | None = None  # CostSettings fields
    cost_round: int = 1

    @model_validator(mode="after")
    def _one_kind(self) -> JobSpec:
        """An every-token kind's settings go with that kind's job only."""
        if self.corpus is not None and self.corpus.kind != self.task:
            raise ValueError(f"a {self.task} job cannot carry {self.corpus.kind} settings")
        return self
