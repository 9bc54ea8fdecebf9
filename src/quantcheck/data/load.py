"""`--dataset SPEC` to a validated, reproducibly sampled `Dataset`."""

from __future__ import annotations

import random
from pathlib import Path

from quantcheck.data.files import read_file
from quantcheck.data.items import Dataset
from quantcheck.data.mmlu import load_mmlu, parse_subjects
from quantcheck.errors import DatasetError

DEFAULT_DATASET = "mmlu:virology"


def load_dataset(spec: str = DEFAULT_DATASET, limit: int | None = None, seed: int = 0) -> Dataset:
    """Read the questions; `limit` keeps a seeded random sample, in the original order."""
    if limit is not None and limit <= 0:
        raise DatasetError(f"--limit must be a positive number of questions, got {limit}")
    if spec.startswith("mmlu:"):
        items, source = load_mmlu(parse_subjects(spec.removeprefix("mmlu:")))
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DatasetError(
                f"dataset {spec!r} is neither an existing file nor mmlu:<subject>[,<subject>...] or mmlu:all"
            )
        items, source = read_file(path), f"file {path.resolve()}"
    if not items:
        raise DatasetError(f"dataset {spec} has no questions: check the file or the subject")
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[index] for index in keep]
    return Dataset(spec=spec, source=source, items=tuple(items))
