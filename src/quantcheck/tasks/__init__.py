"""The data set kinds, registered by name (lm-eval's task registry): `--dataset` picks one, results.json records its
name as `dataset.kind`, and every layer above asks it instead of testing the kind. A new kind is one module here, one
entry in `TASKS` and its name in `schema.results.DatasetKind` (tests/test_tasks.py holds the two equal)."""

from __future__ import annotations

from quantcheck.tasks.base import DataRequest, QualityRequest, Task
from quantcheck.tasks.multiple_choice import MultipleChoice
from quantcheck.tasks.prompts import Prompts
from quantcheck.tasks.text import Text

TASKS: dict[str, Task] = {task.name: task for task in (Text(), Prompts(), MultipleChoice())}
"""In the order `--dataset` is matched: the first kind whose prefix it has; questions, which match anything, last."""

__all__ = ["TASKS", "DataRequest", "QualityRequest", "Task", "task_for", "task_named"]


def task_for(dataset: str) -> Task:
    """The kind `--dataset dataset` names."""
    return next(task for task in TASKS.values() if task.matches(dataset))


def task_named(kind: str) -> Task:
    """The kind results.json's `dataset.kind` (or a job's corpus settings) names."""
    return TASKS[kind]
