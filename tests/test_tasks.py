"""The data set kinds' registry: `--dataset` picks one kind, results.json's `dataset.kind` names one, and the two lists
agree (a kind added to one and not the other fails here, before any run)."""

from __future__ import annotations

import typing

import pytest

from quantcheck.schema.results import DatasetInfo
from quantcheck.tasks import TASKS, task_for, task_named


@pytest.mark.parametrize(
    ("dataset", "kind"),
    [
        ("mmlu:virology", "questions"),
        ("questions.csv", "questions"),
        ("text:builtin", "text"),
        ("text:speech.txt", "text"),
        ("kld:/tmp/base.kld", "text"),
        ("prompts:traffic.jsonl", "prompts"),
    ],
)
def test_the_dataset_option_picks_its_kind(dataset, kind):
    assert task_for(dataset).name == kind


def test_every_kind_results_json_can_name_has_a_task_and_no_task_is_unnamed():
    assert set(typing.get_args(DatasetInfo.model_fields["kind"].annotation)) == set(TASKS)


def test_each_kind_says_what_its_intervals_resample_and_whether_it_scores_every_token():
    assert {name: (task.unit, task.every_token) for name, task in TASKS.items()} == {
        "questions": ("questions", False),
        "text": ("windows", True),
        "prompts": ("prompts", True),
    }
    assert [name for name, task in TASKS.items() if task.sampling_floor] == ["questions"]
    assert [name for name, task in TASKS.items() if task.own_answers] == ["prompts"]
    with pytest.raises(KeyError):
        task_named("gsm8k")
