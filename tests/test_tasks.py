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


def test_a_job_carries_only_its_own_kinds_settings():
    from pydantic import ValidationError

    from quantcheck.schema.jobs import JobSpec
    from quantcheck.schema.models import CorpusJob, ModelSpec

    model = ModelSpec(name="reference", role="reference", backend="hf", method="none", weights="x")
    shared = dict(
        kind="quality", run_dir="r", model=model, device="cpu", dtype="float32", threads=1, seed=0, batch_size=1
    )
    assert JobSpec(**shared, task="text", corpus=CorpusJob(kind="text")).task == "text"
    with pytest.raises(ValidationError, match="a questions job cannot carry text settings"):
        JobSpec(**shared, corpus=CorpusJob(kind="text"))


def test_reading_a_run_asks_the_tasks_without_loading_torch():
    """The summary and the report ask the registry for a kind's facts; that must not import an engine's torch (the
    tasks import backends, scoring and models only inside the functions a run calls)."""
    import subprocess
    import sys

    code = (
        "import sys, quantcheck.tasks, quantcheck.analysis.summarize, quantcheck.report.html, "
        "quantcheck.report.markdown; print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
