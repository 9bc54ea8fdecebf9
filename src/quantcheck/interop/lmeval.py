"""lm-evaluation-harness runs read back and compared document by document.

`lm_eval ... --log_samples --output_path OUT` writes `OUT/<model_name_sanitized>/samples_<task>_<time>.jsonl`:
one line per document and filter, with SHA-256 hashes of the document, the prompt and the target
(`doc_hash`, `prompt_hash`, `target_hash`) and each per-sample metric. Two runs are paired on
(task, filter, doc_id) and compared with quantcheck's paired statistics and accuracy rule. Runs
whose documents, prompts or targets differ are refused: a paired test on different questions, or on
the same questions asked differently, would measure the prompt rather than the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from quantcheck.analysis.verdict import Check, accuracy_check, fail_level
from quantcheck.errors import QuantcheckError
from quantcheck.schema.results import PairedComparison, Thresholds
from quantcheck.stats.paired import compare_paired

SAMPLES_FILE = re.compile(r"^samples_(?P<task>.+)_(?P<stamp>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.jsonl$")
"""lm-eval's name for a task's samples; the stamp is ISO time with ':' as '-', so it sorts by time."""

DEFAULT_METRIC = "acc"
MORE_DOCUMENTS = "drop lm_eval's --limit, or compare more tasks"
POOLED = "all tasks (pooled)"
_HASHES = (("doc_hash", "document"), ("prompt_hash", "prompt"), ("target_hash", "target"))
_WHY_DIFFERENT = {
    "document": "another data set, split or task version",
    "prompt": "another prompt template, few-shot examples, system instruction or chat template",
    "target": "other gold answers",
}


class LmEvalError(QuantcheckError):
    """An lm-eval output folder cannot be read, or two runs cannot be paired."""


def task_label(task: str, filter_name: str) -> str:
    """How a task is named to people: with its filter when it is not lm-eval's default "none"."""
    return task if filter_name == "none" else f"{task} ({filter_name})"


@dataclass(frozen=True)
class Sample:
    """One document of one task as one model answered it."""

    doc_id: int
    hashes: tuple[str, str, str]
    scores: dict[str, float]  # only the metrics whose value is 0 or 1
    answer: str


@dataclass(frozen=True)
class TaskSamples:
    """All samples of one task and filter in one run, by doc_id."""

    task: str
    filter: str
    path: Path
    metrics: tuple[str, ...]  # as lm-eval lists them, in its order
    samples: dict[int, Sample]

    @property
    def label(self) -> str:
        return task_label(self.task, self.filter)

    def binary_metrics(self) -> list[str]:
        """Metrics with a 0/1 value on every sample: the ones a paired accuracy test applies to."""
        return [m for m in self.metrics if all(m in sample.scores for sample in self.samples.values())]


@dataclass(frozen=True)
class LmEvalRun:
    """One model's lm-eval output: the newest samples file of each task in its folder."""

    folder: Path
    model: str
    tasks: dict[tuple[str, str], TaskSamples]


def _binary(value: object) -> float | None:
    """0 or 1 (lm-eval writes acc as 1.0/0.0 and exact_match as 1/0); None for anything else."""
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return float(value)
    return None


def _answer(filtered_resps: object) -> str:
    """What the model answered, for answer agreement: the choice with the highest log-likelihood
    (multiple choice), whether the continuation was greedy (loglikelihood), or the filtered text."""
    if isinstance(filtered_resps, list) and filtered_resps:
        if all(isinstance(r, list) and len(r) == 2 for r in filtered_resps):
            if len(filtered_resps) == 1:
                return str(filtered_resps[0][1])
            logprobs = [float(r[0]) for r in filtered_resps]
            return str(logprobs.index(max(logprobs)))
        if all(isinstance(r, str) for r in filtered_resps):
            return filtered_resps[0]
    return json.dumps(filtered_resps, sort_keys=True)


def _parse_line(line: str, where: str) -> tuple[str, Sample, list[str]]:
    try:
        raw = json.loads(line)
        metrics = [str(m) for m in raw["metrics"]]
        sample = Sample(
            doc_id=int(raw["doc_id"]),
            hashes=tuple(str(raw[key]) for key, _ in _HASHES),  # type: ignore[arg-type]
            scores={m: v for m in metrics if (v := _binary(raw.get(m))) is not None},
            answer=_answer(raw.get("filtered_resps")),
        )
        return str(raw.get("filter", "none")), sample, metrics
    except json.JSONDecodeError:
        raise LmEvalError(f"{where}: not valid JSON; is the file complete?") from None
    except KeyError as missing:
        raise LmEvalError(
            f"{where}: an lm-eval sample line needs {missing}; write the run with lm_eval 0.4 --log_samples"
        ) from None
    except (TypeError, ValueError) as error:
        raise LmEvalError(f"{where}: not an lm-eval sample line ({error})") from None


def read_samples_file(path: Path, task: str) -> Iterator[TaskSamples]:
    """The samples of one file, one `TaskSamples` per filter (a task with two filters logs each document twice)."""
    by_filter: dict[str, tuple[list[str], dict[int, Sample]]] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            filter_name, sample, metrics = _parse_line(line, f"{path}:{lineno}")
            _, samples = by_filter.setdefault(filter_name, (metrics, {}))
            if sample.doc_id in samples:
                raise LmEvalError(
                    f"{path}:{lineno}: doc_id {sample.doc_id} appears twice for filter {filter_name!r}: "
                    "one lm_eval run per file"
                )
            samples[sample.doc_id] = sample
    for filter_name, (metrics, samples) in by_filter.items():
        yield TaskSamples(task, filter_name, path, tuple(metrics), samples)


def _model_name(folder: Path, stamp: str) -> str:
    """The model lm-eval names in the run's results file, else the folder's name (lm-eval's sanitized model name)."""
    results = folder / f"results_{stamp}.json"
    try:
        return str(json.loads(results.read_text(encoding="utf-8"))["model_name"])
    except (OSError, ValueError, KeyError, TypeError):
        return folder.name


def read_run(folder: Path, role: str) -> LmEvalRun:
    """Read an lm-eval --output_path (or the model folder inside it); `role` names it in errors."""
    if not folder.is_dir():
        raise LmEvalError(
            f"{role} {folder} is not a folder: give the --output_path of an lm_eval run made with --log_samples"
        )
    newest: dict[str, tuple[str, Path]] = {}
    parents: set[str] = set()
    for path in sorted(folder.rglob("samples_*.jsonl")):
        match = SAMPLES_FILE.match(path.name)
        if match:
            parents.add(str(path.parent))
            if match["task"] not in newest or match["stamp"] > newest[match["task"]][0]:
                newest[match["task"]] = (match["stamp"], path)
    if not newest:
        raise LmEvalError(
            f"{role} {folder} holds no lm-eval samples files (samples_<task>_<time>.jsonl): "
            "run lm_eval with --log_samples"
        )
    if len(parents) > 1:
        raise LmEvalError(
            f"{role} {folder} holds runs of several models ({', '.join(sorted(parents))}): point at one model's folder"
        )
    tasks = {}
    for task, (_, path) in sorted(newest.items()):
        for samples in read_samples_file(path, task):
            tasks[(samples.task, samples.filter)] = samples
    stamp = max(stamp for stamp, _ in newest.values())
    model_folder = Path(parents.pop())
    return LmEvalRun(folder=folder, model=_model_name(model_folder, stamp), tasks=tasks)


@dataclass(frozen=True)
class TaskComparison:
    """One task's paired comparison and what the accuracy rule concludes from it."""

    task: str
    filter: str
    metric: str
    paired: PairedComparison
    check: Check

    @property
    def label(self) -> str:
        return task_label(self.task, self.filter)


@dataclass(frozen=True)
class Comparison:
    """A variant run against a reference run, task by task, and pooled over tasks when that is well defined."""

    reference: LmEvalRun
    variant: LmEvalRun
    thresholds: Thresholds
    tasks: list[TaskComparison]
    pooled: TaskComparison | None
    skipped: list[str]  # shared tasks not compared, and why
    only_reference: list[str]
    only_variant: list[str]


def check_same_documents(reference: TaskSamples, variant: TaskSamples) -> None:
    """Refuse to pair runs whose documents, prompts or targets differ, naming the first doc_id that does."""
    for doc_id in sorted(reference.samples.keys() & variant.samples.keys()):
        for index, (key, what) in enumerate(_HASHES):
            if reference.samples[doc_id].hashes[index] != variant.samples[doc_id].hashes[index]:
                raise LmEvalError(
                    f"{reference.label}: the {what} of doc_id {doc_id} differs between the runs ({key}; "
                    f"{_WHY_DIFFERENT[what]}): compare two runs of the same task with the same settings"
                )
    only_reference = sorted(reference.samples.keys() - variant.samples.keys())
    only_variant = sorted(variant.samples.keys() - reference.samples.keys())
    if only_reference or only_variant:
        first = (only_reference or only_variant)[0]
        raise LmEvalError(
            f"{reference.label}: the runs scored different documents ({len(reference.samples)} in the reference, "
            f"{len(variant.samples)} in the variant; doc_id {first} is in only one): run both with the same --limit"
        )


def _pick_metric(reference: TaskSamples, variant: TaskSamples, wanted: str | None) -> tuple[str | None, list[str]]:
    """The metric to compare (the one asked for, else acc, else the first 0/1 one) and those available."""
    available = [m for m in reference.binary_metrics() if m in variant.binary_metrics()]
    if wanted is not None:
        return (wanted if wanted in available else None), available
    if DEFAULT_METRIC in available:
        return DEFAULT_METRIC, available
    return (available[0] if available else None), available


Row = tuple[bool, bool, str, str]
"""One document: reference right, variant right, and what each answered."""


def _rows(reference: TaskSamples, variant: TaskSamples, metric: str) -> list[Row]:
    pairs = ((reference.samples[i], variant.samples[i]) for i in sorted(reference.samples))
    return [(ref.scores[metric] == 1, var.scores[metric] == 1, ref.answer, var.answer) for ref, var in pairs]


def _compare(task: str, filter_name: str, metric: str, rows: list[Row], thresholds: Thresholds) -> TaskComparison:
    reference_correct, variant_correct, reference_answers, variant_answers = (list(column) for column in zip(*rows))
    level = fail_level(1)  # one check per task: its rejection interval is the 95 % one
    paired = compare_paired(reference_correct, variant_correct, reference_answers, variant_answers, fail_level=level)
    check = accuracy_check(f"{task_label(task, filter_name)} ({metric})", paired, thresholds, level, MORE_DOCUMENTS)
    return TaskComparison(task, filter_name, metric, paired, check)


def compare_runs(reference: LmEvalRun, variant: LmEvalRun, metric: str | None, thresholds: Thresholds) -> Comparison:
    """Pair two runs on every shared task and compare them; refuse runs that cannot be paired."""
    shared = sorted(reference.tasks.keys() & variant.tasks.keys())
    if not shared:

        def names(run: LmEvalRun) -> str:
            return ", ".join(samples.label for samples in run.tasks.values())

        raise LmEvalError(
            f"the runs share no task: the reference has {names(reference)}; the variant has {names(variant)}"
        )
    compared: list[TaskComparison] = []
    pooled_rows: list[Row] = []
    skipped: list[str] = []
    for key in shared:
        ref_task, var_task = reference.tasks[key], variant.tasks[key]
        check_same_documents(ref_task, var_task)
        chosen, available = _pick_metric(ref_task, var_task, metric)
        if chosen is None:
            wanted = f" {metric!r}" if metric else ""
            skipped.append(
                f"{ref_task.label}: no 0/1 per-sample metric{wanted} (has: {', '.join(available) or 'none'})"
            )
            continue
        rows = _rows(ref_task, var_task, chosen)
        compared.append(_compare(ref_task.task, ref_task.filter, chosen, rows, thresholds))
        pooled_rows += rows
    if not compared:
        raise LmEvalError("no shared task can be compared: " + "; ".join(skipped))
    # Pooling is the sample-weighted mean lm-eval reports for a group; a task scored under two
    # filters would count its documents twice, so then there is no pooled row.
    one_filter_each = len({c.task for c in compared}) == len(compared)
    pooled = None
    if len(compared) > 1 and one_filter_each:
        metrics = "/".join(sorted({c.metric for c in compared}))
        pooled = _compare(POOLED, "none", metrics, pooled_rows, thresholds)
    return Comparison(
        reference=reference,
        variant=variant,
        thresholds=thresholds,
        tasks=compared,
        pooled=pooled,
        skipped=skipped,
        only_reference=sorted(reference.tasks[key].label for key in reference.tasks.keys() - variant.tasks.keys()),
        only_variant=sorted(variant.tasks[key].label for key in variant.tasks.keys() - reference.tasks.keys()),
    )
