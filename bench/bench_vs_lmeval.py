"""The whole command against lm-eval on the same 166 virology questions, back to back on one machine.

- quantcheck: `quantcheck run --quant bnb-nf4-dq --skip-cost --skip-generation --no-floors`, the command
  the backend issue timed (the numeric floor, added since, is one more reference pass at batch size 1
  that lm-eval does not make; it is timed separately).
- lm-eval 0.4.13: `python -m lm_eval --model hf` on the reference and on a saved NF4-DQ copy made by
  quantcheck's own registry, over a local task with quantcheck's prompt scored on " A".." D": the same
  two accuracies (target: quantcheck <= 0.7x lm-eval's time).

Prints the wall times, the ratio, whether the answers agree item by item, and where quantcheck's time
goes, read from its run folder's file times: each worker's start (process and imports) to its model
loaded (engine.json), the scoring pass (to the last record), and the parent's summary and report.
Usage: python bench/bench_vs_lmeval.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANT = "bnb-nf4-dq"
LETTERS_PROMPT = (  # quantcheck.data.prompts.loglik_prompt as an lm-eval template
    "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def timed(command: list[str], **kwargs) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=OFFLINE, **kwargs)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} failed: {result.stderr[-2000:]}")
    return time.perf_counter() - start


def write_task(folder: Path) -> Path:
    from quantcheck.data.load import load_dataset
    from quantcheck.interop.lmeval_export import lmeval_doc

    folder.mkdir(parents=True)
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps(lmeval_doc(item)) + "\n" for item in load_dataset("mmlu:virology").items))
    task = [
        "task: qc_letters",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {questions}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_target: answer",
        f"doc_to_text: {json.dumps(LETTERS_PROMPT)}",
        'doc_to_choice: ["A", "B", "C", "D"]',
        "metric_list:",
        "  - metric: acc",
    ]
    (folder / "qc_letters.yaml").write_text("\n".join(task) + "\n")
    return folder


def save_variant(folder: Path) -> Path:
    """The NF4-DQ variant as quantcheck's registry makes it, saved for lm-eval (transformers 5 refuses
    load_in_4bit=True)."""
    import torch

    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.loading import load_model, load_tokenizer
    from quantcheck.models.quant_methods import LoadRequest, get_method

    model = load_model(get_method(VARIANT), LoadRequest(str(builtin_model_dir()), "cpu", torch.float32))
    model.save_pretrained(folder)
    load_tokenizer(str(builtin_model_dir())).save_pretrained(folder)
    return folder


def lm_eval(model: Path, tasks: Path, out: Path) -> tuple[float, list[int]]:
    seconds = timed(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--tasks",
            "qc_letters",
            "--include_path",
            str(tasks),
            "--log_samples",
            "--output_path",
            str(out),
            "--device",
            "cpu",
            "--batch_size",
            "8",
        ],
        cwd=out.parent,
    )
    (samples,) = out.rglob("samples_qc_letters_*.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    return seconds, [max(range(4), key=lambda choice: float(row["filtered_resps"][choice][0])) for row in rows]


def quantcheck_answers(run: Path, model: str) -> list[int]:
    from quantcheck.data.items import LETTERS

    records = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    order = [json.loads(line)["item_id"] for line in (run / "dataset.jsonl").read_text().splitlines()]
    by_id = {record["item_id"]: record for record in records if record["model"] == model}
    return [LETTERS.index(by_id[item_id]["loglik"]["pred"]) for item_id in order]


def breakdown(run: Path) -> list[tuple[str, float]]:
    """Seconds per step, from the times the run folder's files were last written."""
    mtime = lambda path: path.stat().st_mtime  # noqa: E731
    steps, previous = [], mtime(run / "dataset.jsonl")
    for model in sorted((run / "models").iterdir(), key=lambda folder: mtime(folder / "quality.job.json")):
        started, loaded, scored = (mtime(model / name) for name in ("quality.job.json", "engine.json", "quality.jsonl"))
        steps += [
            (f"{model.name}: parent until the job starts", started - previous),
            (f"{model.name}: worker start, imports and load", loaded - started),
            (f"{model.name}: scoring pass", scored - loaded),
        ]
        previous = scored
    steps += [
        ("summary (results.json)", mtime(run / "results.json") - previous),
        ("report (report.html, plots)", mtime(run / "report.html") - mtime(run / "results.json")),
    ]
    return steps


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        run, floors_run = root / "qc", root / "qc-floors"
        command = [
            sys.executable,
            "-m",
            "quantcheck.cli",
            "run",
            "--quant",
            VARIANT,
            "--skip-cost",
            "--skip-generation",
            "--quiet",
        ]
        quantcheck_s = timed([*command, "--no-floors", "--out", str(run)])
        floors_s = timed([*command, "--out", str(floors_run)])
        tasks = write_task(root / "tasks")
        reference_s, reference_answers = lm_eval(Path(_builtin()), tasks, root / "lm-reference")
        variant_s, variant_answers = lm_eval(save_variant(root / "nf4-dq"), tasks, root / "lm-variant")
        lmeval_s = reference_s + variant_s
        same = (
            quantcheck_answers(run, "reference") == reference_answers,
            quantcheck_answers(run, VARIANT) == variant_answers,
        )
        print(f"quantcheck (--no-floors): {quantcheck_s:.1f} s; with the noise floors: {floors_s:.1f} s")
        print(
            f"lm-eval: {lmeval_s:.1f} s ({reference_s:.1f} s reference + {variant_s:.1f} s {VARIANT}, "
            "model saving not counted)"
        )
        print(
            f"ratio quantcheck / lm-eval: {quantcheck_s / lmeval_s:.2f} (target <= 0.7); "
            f"with floors {floors_s / lmeval_s:.2f}"
        )
        print(f"answers identical item by item: reference {same[0]}, {VARIANT} {same[1]}")
        print("where quantcheck's time goes (--no-floors):")
        for step, seconds in breakdown(run):
            print(f"  {step:<55} {seconds:6.1f} s")


def _builtin() -> str:
    from quantcheck.models.builtin import builtin_model_dir

    return str(builtin_model_dir())


if __name__ == "__main__":
    main()
