"""A quantcheck run's answers written as lm-eval samples, for lm-eval tooling and `compare-lmeval`.

Each model with log-likelihood answers becomes `OUT/<model>/samples_<task>_<time>.jsonl`, one line
per question, as `lm_eval --log_samples` writes a zero-shot multiple-choice task scored on the
answer letters: the document (with the fields of lm-eval's MMLU documents), the gold index as target, one request per
letter (the prompt and " A".." D"), `[log-likelihood, is_greedy]` per letter, `acc`, and the SHA-256 hashes of document,
prompt and target computed as lm-eval computes them, so that a real lm-eval run of the same
questions with quantcheck's prompt pairs with the export document by document.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

from quantcheck.data.items import Item
from quantcheck.data.prompts import answer_continuations, loglik_prompt
from quantcheck.errors import QuantcheckError, ResultsFolderError
from quantcheck.report.data import DATASET_FILE, ITEMS_FILE
from quantcheck.schema.results import ItemRecord, LoglikAnswer
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import read_records, write_text_atomic

TASK_NAME = re.compile(r"[\w.\-]+")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lmeval_doc(item: Item) -> dict[str, object]:
    """The document with the fields of lm-eval's MMLU documents, in their order (the doc hash depends on it)."""
    return {"question": item.question, "subject": item.subject, "choices": list(item.choices), "answer": item.answer}


def sample_line(doc_id: int, item: Item, answer: LoglikAnswer, top_logprob: float) -> dict[str, object]:
    """One lm-eval sample. is_greedy: the letter was the model's most likely next token (`top_logprob`)."""
    doc = lmeval_doc(item)
    prompt = loglik_prompt(item)
    responses = [[str(logprob), str(logprob >= top_logprob)] for logprob in answer.choice_logprobs]
    target = str(item.answer)
    return {
        "doc_id": doc_id,
        "doc": doc,
        "target": target,
        "arguments": {
            f"gen_args_{i}": {"arg_0": prompt, "arg_1": letter}
            for i, letter in enumerate(answer_continuations(len(item.choices)))
        },
        "resps": [[response] for response in responses],
        "filtered_resps": responses,
        "filter": "none",
        "metrics": ["acc"],
        "doc_hash": _sha256(json.dumps(doc, indent=2, ensure_ascii=False)),
        "prompt_hash": _sha256(prompt),
        "target_hash": _sha256(target),
        "acc": 1.0 if answer.correct else 0.0,
    }


def export_run(run_dir: Path, out: Path, task: str) -> list[Path]:
    """Write one samples file per model of `run_dir` that has log-likelihood answers; return their paths."""
    if not TASK_NAME.fullmatch(task):
        raise QuantcheckError(f"--task must be letters, digits, '_', '-' or '.', got {task!r}")
    folder = RunFolder(run_dir)
    for name in (DATASET_FILE, ITEMS_FILE):
        if not (run_dir / name).is_file():
            raise ResultsFolderError(
                f"{run_dir} has no {name}: give a quantcheck run folder whose quality phase has run"
            )
    doc_ids = {item.item_id: (doc_id, item) for doc_id, item in enumerate(folder.read_items())}
    answers: dict[str, list[tuple[int, Item, LoglikAnswer, list[float]]]] = {}
    for record in read_records(run_dir / ITEMS_FILE, ItemRecord):
        if record.loglik is not None:
            doc_id, item = doc_ids[record.item_id]
            answers.setdefault(record.model, []).append((doc_id, item, record.loglik, record.topk_logprobs))
    if not answers:
        raise ResultsFolderError(f"{run_dir} has no log-likelihood answers to export (was it run with --skip-quality?)")
    stamp = datetime.now().isoformat().replace(":", "-")
    written = []
    for model, rows in answers.items():
        lines = []
        for doc_id, item, answer, topk_logprobs in sorted(rows, key=lambda row: row[0]):
            if not topk_logprobs:
                raise ResultsFolderError(
                    f"{run_dir / ITEMS_FILE}: {model} on {item.item_id} "
                    "has no top-k log-probabilities to tell greedy answers"
                )
            lines.append(json.dumps(sample_line(doc_id, item, answer, topk_logprobs[0]), ensure_ascii=False) + "\n")
        written.append(write_text_atomic(out / model / f"samples_{task}_{stamp}.jsonl", "".join(lines)))
    return written
