"""Reading a run folder for the report, tolerant of partial runs, and writing files atomically.

Only `results.json` is required. `items.jsonl`, `dataset.jsonl` and a text corpus's
`models/<model>/corpus.jsonl` may be absent (a partial run) or end with a truncated line (a run that
crashed while writing); what cannot be read is recorded in :attr:`RunData.problems` so the report
can say what is missing instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from quantcheck.errors import ResultsFolderError
from quantcheck.schema.results import ItemRecord, ModelResult, Results, WindowRecord
from quantcheck.schema.sensitivity import SensitivityTable
from quantcheck.storage.folder import RunFolder
from quantcheck.tasks import task_named

RESULTS_FILE = "results.json"
ITEMS_FILE = "items.jsonl"
DATASET_FILE = "dataset.jsonl"
CORPUS_FILE = "corpus.jsonl"
MODELS_DIR = "models"
REFERENCE = "reference"

# Reported bad lines are capped so a garbage file does not flood the report.
_MAX_REPORTED_BAD_LINES = 5

Record = TypeVar("Record", bound=BaseModel)


@dataclass
class DatasetItem:
    """One question of `dataset.jsonl` (read leniently: it is not a schema class)."""

    item_id: str
    subject: str = ""
    question: str = ""
    choices: list[str] = field(default_factory=list)
    answer: str = ""


@dataclass
class RunData:
    """Everything the report reads from one run folder."""

    run_dir: Path
    results: Results
    items: list[ItemRecord] = field(default_factory=list)
    dataset: dict[str, DatasetItem] = field(default_factory=dict)
    has_items_file: bool = False
    has_dataset_file: bool = False
    windows: dict[str, list[WindowRecord]] = field(default_factory=dict)
    """A text corpus: each model's per-window records (by display name), in window order."""
    sensitivity: SensitivityTable | None = None
    """`quantcheck sensitivity`'s ranking and proposals, where this run folder is one."""
    problems: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return is_text_run(self.results)

    @property
    def kind(self) -> str:
        """Which figures belong to the run: "text" (every token scored: a text or prompts) or "questions"."""
        return "text" if self.is_text else "questions"

    @property
    def kinds(self) -> set[str]:
        """The figure kinds this run draws: its own, and "sensitivity" where sensitivity.json is there."""
        return {self.kind} | ({"sensitivity"} if self.sensitivity else set())

    @property
    def reference(self) -> ModelResult | None:
        return reference_model(self.results)

    @property
    def variants(self) -> list[ModelResult]:
        return variant_models(self.results)


def is_text_run(results: Results) -> bool:
    """Every token scored (a text corpus's windows, or the reference's answers to users' prompts): no questions,
    so no accuracy, items or choices to show."""
    return results.dataset is not None and task_named(results.dataset.kind).every_token


def reference_model(results: Results) -> ModelResult | None:
    """The reference: the model named "reference", else the first one without a quantization."""
    for m in results.models:
        if m.name == REFERENCE:
            return m
    for m in results.models:
        if m.quant is None:
            return m
    return None


def variant_models(results: Results) -> list[ModelResult]:
    ref = reference_model(results)
    return [m for m in results.models if m is not ref]


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def load_results(run_dir: Path) -> Results:
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise ResultsFolderError(f"{run_dir} has no {RESULTS_FILE}: is it a quantcheck run folder?")
    try:
        return Results.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        raise ResultsFolderError(
            f"{path} is not a valid quantcheck results file ({exc.error_count()} error(s), "
            f"first at {where}: {_one_line(first.get('msg', ''))}): is it a quantcheck run folder?"
        ) from None
    except OSError as exc:
        raise ResultsFolderError(f"{path} cannot be read: {_one_line(str(exc))}") from None


def _read_jsonl_lines(path: Path, problems: list[str]) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        problems.append(f"{path.name} cannot be read: {_one_line(str(exc))}")
        return []
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _load_records(path: Path, name: str, model: type[Record], what: str, problems: list[str]) -> list[Record]:
    """The valid lines of a JSONL file (`name` in messages); an invalid one (a torn last line) is a problem, not an
    error."""
    records: list[Record] = []
    bad = 0
    for lineno, line in _read_jsonl_lines(path, problems):
        try:
            records.append(model.model_validate_json(line))
        except ValidationError as exc:
            bad += 1
            if bad <= _MAX_REPORTED_BAD_LINES:
                msg = exc.errors()[0].get("msg", "") if exc.errors() else str(exc)
                problems.append(f"{name} line {lineno} is not a valid {what}: {_one_line(msg)}")
    if bad > _MAX_REPORTED_BAD_LINES:
        problems.append(f"{name}: {bad - _MAX_REPORTED_BAD_LINES} more invalid lines not listed")
    return records


def load_items(path: Path, problems: list[str]) -> list[ItemRecord]:
    return _load_records(path, path.name, ItemRecord, "item record", problems)


def load_windows(models_dir: Path, problems: list[str]) -> dict[str, list[WindowRecord]]:
    """Every model's corpus records, keyed by the model each record names (its display name, whatever
    its folder is called); a window scored again after a crash counts once, as its latest copy."""
    latest: dict[str, dict[int, WindowRecord]] = {}
    for path in sorted(models_dir.glob(f"*/{CORPUS_FILE}")):
        name = f"{MODELS_DIR}/{path.parent.name}/{CORPUS_FILE}"
        for record in _load_records(path, name, WindowRecord, "window record", problems):
            latest.setdefault(record.model, {})[record.window] = record
    return {model: [records[w] for w in sorted(records)] for model, records in latest.items()}


def load_dataset(path: Path, problems: list[str]) -> dict[str, DatasetItem]:
    out: dict[str, DatasetItem] = {}
    bad = 0
    for lineno, line in _read_jsonl_lines(path, problems):
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict) or "item_id" not in raw:
                raise ValueError("not an object with an item_id")
            choices = raw.get("choices") or []
            if not isinstance(choices, list):
                raise ValueError("choices is not a list")
            item = DatasetItem(
                item_id=str(raw["item_id"]),
                subject=str(raw.get("subject") or ""),
                question=str(raw.get("question") or ""),
                choices=[str(c) for c in choices],
                answer=str(raw.get("answer") or ""),
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            bad += 1
            if bad <= _MAX_REPORTED_BAD_LINES:
                problems.append(f"{path.name} line {lineno} cannot be read: {_one_line(str(exc))}")
            continue
        out[item.item_id] = item
    if bad > _MAX_REPORTED_BAD_LINES:
        problems.append(f"{path.name}: {bad - _MAX_REPORTED_BAD_LINES} more invalid lines not listed")
    return out


def load_run(run_dir: Path) -> RunData:
    """Read a run folder. Raises `ResultsFolderError` only when results.json is missing or invalid."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    data = RunData(run_dir=run_dir, results=results)
    items_path = run_dir / ITEMS_FILE
    dataset_path = run_dir / DATASET_FILE
    if items_path.is_file():
        data.has_items_file = True
        data.items = load_items(items_path, data.problems)
    if dataset_path.is_file():
        data.has_dataset_file = True
        data.dataset = load_dataset(dataset_path, data.problems)
    if data.is_text:
        data.windows = load_windows(run_dir / MODELS_DIR, data.problems)
    sensitivity = RunFolder(run_dir).sensitivity_file
    if sensitivity.is_file():
        try:
            data.sensitivity = SensitivityTable.model_validate_json(sensitivity.read_bytes())
        except ValueError as exc:
            data.problems.append(f"{sensitivity.name} cannot be read: {_one_line(str(exc))}")
    return data
