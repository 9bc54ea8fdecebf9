"""lm-eval interop on real lm-evaluation-harness output made here, with the built-in model.

The fixture writes two small lm-eval tasks over the first MMLU virology questions and runs
`python -m lm_eval --log_samples` on the built-in model twice, on an NF4 copy of it (made with
quantcheck's own registry and saved, because transformers 5 no longer accepts lm-eval's
`load_in_4bit=True` model argument), and on a question file with one question changed.

- qc_virology scores the answers' own texts as continuations: sensitive enough that NF4 flips some.
- qc_letters is quantcheck's own prompt scored on " A".." D", so it pairs with `export-lmeval` output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from scipy import stats

from conftest import quantcheck, write_questions
from quantcheck.analysis.verdict import fail_level
from quantcheck.data.load import load_dataset
from quantcheck.interop.lmeval_export import lmeval_doc
from quantcheck.report.markdown import parse_md_table
from test_cli_errors import assert_one_line_error

QUESTIONS = 24
TASK = "qc_virology"
LETTERS_TASK = "qc_letters"
# quantcheck's log-likelihood prompt (quantcheck.data.prompts.loglik_prompt) as an lm-eval template.
LETTERS_PROMPT = (
    "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)


def task_yaml(name: str, questions: Path, prompt: str, choices: str | list[str], metrics: list[str]) -> str:
    """An lm-eval multiple-choice task over a local JSONL file (JSON strings are YAML strings)."""
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {questions}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_target: answer",
        f"doc_to_text: {json.dumps(prompt)}",
        f"doc_to_choice: {json.dumps(choices)}",
        "metric_list:",
    ]
    return "\n".join(lines + [f"  - metric: {metric}" for metric in metrics]) + "\n"


@dataclass(frozen=True)
class LmEvalRuns:
    reference: Path  # built-in model, both tasks
    rerun: Path  # the same again
    variant: Path  # its NF4 copy, qc_virology only
    other: Path  # qc_virology on 6 questions, doc_id 2 rewritten


def write_task(folder: Path, count: int, changed_at: int | None = None) -> Path:
    """A questions file of lm-eval documents and the two task YAMLs that read it."""
    folder.mkdir(parents=True)
    lines = []
    for index, item in enumerate(load_dataset("mmlu:virology").items[:count]):
        doc = lmeval_doc(item)
        if index == changed_at:
            doc["question"] = "Which of these viruses is not a virus?"
        lines.append(json.dumps(doc) + "\n")
    questions = folder / "questions.jsonl"
    questions.write_text("".join(lines))
    (folder / f"{TASK}.yaml").write_text(
        task_yaml(TASK, questions, "Question: {{question.strip()}}\nAnswer:", "{{choices}}", ["acc", "acc_norm"])
    )
    (folder / f"{LETTERS_TASK}.yaml").write_text(
        task_yaml(LETTERS_TASK, questions, LETTERS_PROMPT, ["A", "B", "C", "D"], ["acc"])
    )
    return folder


def lm_eval(model: Path, tasks: str, include: Path, out: Path) -> Path:
    """A real `lm_eval --log_samples` run on CPU, offline, on one thread (two run side by side)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out.parent / f"hf-datasets-{out.name}"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--tasks",
            tasks,
            "--include_path",
            str(include),
            "--log_samples",
            "--output_path",
            str(out),
            "--device",
            "cpu",
            "--batch_size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=out.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def save_nf4_copy(folder: Path) -> Path:
    """The built-in model quantized by quantcheck's registry (bnb-nf4) and saved, for lm-eval to load."""
    import torch

    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.loading import load_model, load_tokenizer
    from quantcheck.models.quant_methods import LoadRequest, get_method

    source = builtin_model_dir()
    model = load_model(get_method("bnb-nf4"), LoadRequest(str(source), "cpu", torch.float32))
    model.save_pretrained(folder)
    load_tokenizer(str(source)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lmeval_runs(tmp_path_factory) -> LmEvalRuns:
    from quantcheck.models.builtin import builtin_model_dir

    root = tmp_path_factory.mktemp("lmeval")
    tasks = write_task(root / "tasks", QUESTIONS)
    other_tasks = write_task(root / "other-tasks", 6, changed_at=2)
    model, nf4 = builtin_model_dir(), save_nf4_copy(root / "nf4")
    both = f"{TASK},{LETTERS_TASK}"
    runs = [
        (model, both, tasks, root / "reference"),
        (model, both, tasks, root / "rerun"),
        (nf4, TASK, tasks, root / "variant"),
        (model, TASK, other_tasks, root / "other"),
    ]
    with ThreadPoolExecutor(
        max_workers=2
    ) as pool:  # most of a run is lm-eval's single-threaded start-up: two at a time
        return LmEvalRuns(*pool.map(lambda run: lm_eval(*run), runs))


def samples(run: Path, task: str) -> list[dict]:
    (path,) = run.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def lmeval_accuracy(run: Path, task: str, metric: str) -> float:
    (path,) = run.glob("*/results_*.json")
    return json.loads(path.read_text())["results"][task][f"{metric},none"]


def compare(a: Path, b: Path, out: Path, *options: str) -> dict:
    result = quantcheck("compare-lmeval", str(a), str(b), "--out", str(out), *options)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "comparison.json").read_text())


def test_two_runs_of_the_same_model_flip_nothing(lmeval_runs: LmEvalRuns, tmp_path: Path) -> None:
    document = compare(lmeval_runs.reference, lmeval_runs.rerun, tmp_path)
    results = document["tasks"] + [document["pooled"]]
    assert [(r["task"], r["metric"], r["paired"]["n"]) for r in results] == [
        (LETTERS_TASK, "acc", QUESTIONS),
        (TASK, "acc", QUESTIONS),
        ("all tasks (pooled)", "acc", 2 * QUESTIONS),
    ]
    for result in results:
        paired = result["paired"]
        assert (paired["right_to_wrong"], paired["wrong_to_right"], paired["mcnemar_p"]) == (0, 0, 1.0)
        assert paired["difference"] == 0 and paired["answer_agreement"] == 1.0
    assert document["tasks"][1]["paired"]["reference_accuracy"] == pytest.approx(
        lmeval_accuracy(lmeval_runs.reference, TASK, "acc")
    )
    rows = parse_md_table((tmp_path / "report.md").read_text(), "Task")
    assert [(row[0], row[2], row[6]) for row in rows] == [
        (LETTERS_TASK, "24", "0 / 0"),
        (TASK, "24", "0 / 0"),
        ("all tasks (pooled)", "48", "0 / 0"),
    ]


@pytest.mark.parametrize("metric", [None, "acc_norm"])
def test_model_against_nf4_matches_a_direct_count(lmeval_runs: LmEvalRuns, tmp_path: Path, metric: str | None) -> None:
    document = compare(lmeval_runs.reference, lmeval_runs.variant, tmp_path, *(["--metric", metric] if metric else []))
    name = metric or "acc"
    reference = {s["doc_id"]: s[name] for s in samples(lmeval_runs.reference, TASK)}
    variant = {s["doc_id"]: s[name] for s in samples(lmeval_runs.variant, TASK)}
    right_to_wrong = sum(1 for doc_id, score in reference.items() if score == 1 and variant[doc_id] == 0)
    wrong_to_right = sum(1 for doc_id, score in reference.items() if score == 0 and variant[doc_id] == 1)

    (result,) = document["tasks"]
    paired = result["paired"]
    assert (result["task"], result["metric"], paired["n"]) == (TASK, name, QUESTIONS)
    assert (paired["right_to_wrong"], paired["wrong_to_right"]) == (right_to_wrong, wrong_to_right)
    discordant = right_to_wrong + wrong_to_right
    expected_p = stats.binomtest(right_to_wrong, discordant, 0.5).pvalue if discordant else 1.0
    assert paired["mcnemar_p"] == pytest.approx(expected_p, rel=1e-12)
    assert paired["reference_accuracy"] == pytest.approx(lmeval_accuracy(lmeval_runs.reference, TASK, name))
    assert paired["variant_accuracy"] == pytest.approx(lmeval_accuracy(lmeval_runs.variant, TASK, name))
    assert document["verdict"] == result["verdict"] and document["pooled"] is None
    assert document["only_reference"] == [LETTERS_TASK] and document["only_variant"] == []


def test_nf4_changes_some_answers(lmeval_runs: LmEvalRuns, tmp_path: Path) -> None:
    """Without a real difference between the runs the direct-count test above would compare zeros."""
    document = compare(lmeval_runs.reference, lmeval_runs.variant, tmp_path)
    assert document["tasks"][0]["paired"]["answer_agreement"] < 1.0


def test_runs_on_other_documents_are_refused(lmeval_runs: LmEvalRuns) -> None:
    result = quantcheck(
        "compare-lmeval",
        str(lmeval_runs.reference),
        str(lmeval_runs.other),
        "--out",
        str(lmeval_runs.other.parent / "refused"),
    )
    assert_one_line_error(result, f"{TASK}: the document of doc_id 2 differs between the runs")


def copy_samples(run: Path, task: str, folder: Path, as_task: str | None = None, keep: int | None = None) -> Path:
    """One real samples file in a new run folder, possibly renamed to another task or cut short."""
    (path,) = run.glob(f"*/samples_{task}_*.jsonl")
    target = folder / path.parent.name / path.name.replace(task, as_task or task)
    target.parent.mkdir(parents=True)
    lines = path.read_text().splitlines(keepends=True)
    target.write_text("".join(lines[:keep]))
    return folder


def test_same_documents_asked_differently_are_refused(lmeval_runs: LmEvalRuns, tmp_path: Path) -> None:
    """qc_letters reads the same questions file as qc_virology, with another prompt."""
    disguised = copy_samples(lmeval_runs.reference, LETTERS_TASK, tmp_path / "disguised", as_task=TASK)
    result = quantcheck("compare-lmeval", str(lmeval_runs.reference), str(disguised), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, f"{TASK}: the prompt of doc_id 0 differs between the runs")


@pytest.mark.parametrize(
    "make_runs, fragments",
    [
        (lambda runs, tmp: (tmp / "missing", runs.rerun), ["RUN_A", "is not a folder"]),
        (lambda runs, tmp: (runs.reference, tmp), ["RUN_B", "holds no lm-eval samples files", "--log_samples"]),
        (
            lambda runs, tmp: (copy_samples(runs.reference, LETTERS_TASK, tmp / "a"), runs.variant),
            ["share no task", LETTERS_TASK, TASK],
        ),
        (
            lambda runs, tmp: (runs.reference, copy_samples(runs.rerun, TASK, tmp / "b", keep=20)),
            ["different documents", "24 in the reference, 20 in the variant"],
        ),
        (
            lambda runs, tmp: (runs.reference, runs.variant, "--metric", "exact_match"),
            ["no 0/1 per-sample metric 'exact_match'", "acc, acc_norm"],
        ),
        (
            lambda runs, tmp: (runs.reference, runs.variant, "--max-accuracy-drop", "-1"),
            ["--max-accuracy-drop must be between 0 and 100"],
        ),
        (lambda runs, tmp: (runs.reference.parent, runs.variant), ["holds runs of several models"]),
    ],
    ids=[
        "not-a-folder",
        "no-samples",
        "no-common-task",
        "other-limit",
        "unknown-metric",
        "bad-threshold",
        "several-models",
    ],
)
def test_bad_input_gets_one_line(lmeval_runs: LmEvalRuns, tmp_path: Path, make_runs, fragments: list[str]) -> None:
    args = [str(arg) for arg in make_runs(lmeval_runs, tmp_path)]
    result = quantcheck("compare-lmeval", *args, "--out", str(tmp_path / "out"))
    assert_one_line_error(result, *fragments)


def test_a_torn_samples_file_gets_one_line(lmeval_runs: LmEvalRuns, tmp_path: Path) -> None:
    torn = copy_samples(lmeval_runs.rerun, TASK, tmp_path / "torn")
    (path,) = torn.glob("*/*.jsonl")
    path.write_text(path.read_text()[:-200])
    result = quantcheck("compare-lmeval", str(lmeval_runs.reference), str(torn), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, f"{path.name}:{QUESTIONS}: not valid JSON")


@pytest.fixture(scope="session")
def quantcheck_run(tmp_path_factory) -> Path:
    """quantcheck's own run of the same questions: the built-in model against bnb-nf4, quality only."""
    root = tmp_path_factory.mktemp("quantcheck-run")
    questions = write_questions(root / "questions.jsonl", QUESTIONS)
    out = root / "run"
    result = quantcheck(
        "run", "--quant", "bnb-nf4", "--dataset", str(questions), "--out", str(out), "--skip-cost", "--skip-generation"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def export(run: Path, out: Path) -> list[Path]:
    result = quantcheck("export-lmeval", str(run), str(out), "--task", LETTERS_TASK)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


def test_export_round_trip_reproduces_quantcheck_statistics(quantcheck_run: Path, tmp_path: Path) -> None:
    files = export(quantcheck_run, tmp_path / "export")
    assert sorted(path.parent.name for path in files) == ["bnb-nf4", "reference"]
    document = compare(tmp_path / "export" / "reference", tmp_path / "export" / "bnb-nf4", tmp_path / "compared")
    results = json.loads((quantcheck_run / "results.json").read_text())
    (nf4,) = [model for model in results["models"] if model["name"] == "bnb-nf4"]
    exported, ours = dict(document["tasks"][0]["paired"]), dict(nf4["paired_loglik"])
    # compare-lmeval makes one check per task; quantcheck's verdict splits its error rate over several checks.
    assert exported.pop("difference_fail_ci")["level"] == pytest.approx(fail_level(1))
    assert ours.pop("difference_fail_ci")["level"] > fail_level(1)
    assert exported == ours


def test_export_pairs_with_a_real_lmeval_run(quantcheck_run: Path, lmeval_runs: LmEvalRuns, tmp_path: Path) -> None:
    """Same documents, prompt and targets as lm-eval hashes them; the log-likelihoods are lm-eval's own."""
    export(quantcheck_run, tmp_path / "export")
    document = compare(tmp_path / "export" / "reference", lmeval_runs.reference, tmp_path / "compared")
    (result,) = document["tasks"]
    assert (result["task"], result["paired"]["n"], result["paired"]["answer_agreement"]) == (
        LETTERS_TASK,
        QUESTIONS,
        1.0,
    )
    assert (result["paired"]["right_to_wrong"], result["paired"]["wrong_to_right"]) == (0, 0)
    exported = samples(tmp_path / "export" / "reference", LETTERS_TASK)
    real = samples(lmeval_runs.reference, LETTERS_TASK)
    for ours, theirs in zip(exported, real, strict=True):
        assert [float(lp) for lp, _ in ours["filtered_resps"]] == pytest.approx(
            [float(lp) for lp, _ in theirs["filtered_resps"]], abs=1e-4
        )
        assert [greedy for _, greedy in ours["filtered_resps"]] == [greedy for _, greedy in theirs["filtered_resps"]]


def test_export_of_a_folder_that_is_not_a_run_gets_one_line(tmp_path: Path) -> None:
    result = quantcheck("export-lmeval", str(tmp_path), str(tmp_path / "out"))
    assert_one_line_error(result, "has no dataset.jsonl", "quantcheck run folder")
