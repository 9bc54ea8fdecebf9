"""The unit of evaluation: one multiple-choice question, and a loaded data set of them."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass

from quantcheck.errors import DatasetError

LETTERS = string.ascii_uppercase[:10]


@dataclass(frozen=True)
class Item:
    item_id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def to_json(self) -> dict[str, object]:
        """The `dataset.jsonl` line: what the report shows next to each model's answer."""
        record = asdict(self)
        record["choices"] = list(self.choices)
        record["answer"] = self.answer_letter
        return record


@dataclass(frozen=True)
class Dataset:
    spec: str
    source: str
    items: tuple[Item, ...]

    @property
    def subjects(self) -> list[str]:
        return sorted({item.subject for item in self.items})

    def content_hash(self) -> str:
        """Identity of exactly these questions, answers and order: part of the reference's cache key."""
        payload = json.dumps([item.to_json() for item in self.items], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_answer(raw: object, n_choices: int, where: str) -> int:
    """Accept a letter ("B") or a 0-based index (1); anything else names the file and line."""
    if isinstance(raw, bool):
        raise DatasetError(f"{where}: answer must be a letter or a 0-based index, got {raw!r}")
    if isinstance(raw, int):
        index = raw
    elif isinstance(raw, str) and raw.strip().upper() in LETTERS and len(raw.strip()) == 1:
        index = LETTERS.index(raw.strip().upper())
    else:
        raise DatasetError(
            f"{where}: answer must be a letter A-{LETTERS[n_choices - 1]} or a 0-based index, got {raw!r}"
        )
    if not 0 <= index < n_choices:
        raise DatasetError(f"{where}: answer {raw!r} is out of range for {n_choices} choices")
    return index


def make_item(item_id: str, subject: str, question: object, choices: list[object], answer: object, where: str) -> Item:
    """Validate one question; every problem is reported with its file and line."""
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: question is missing or empty")
    if not 2 <= len(choices) <= len(LETTERS):
        raise DatasetError(f"{where}: needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    if not all(isinstance(choice, str) and choice.strip() for choice in choices):
        raise DatasetError(f"{where}: every choice must be non-empty text")
    return Item(item_id, subject, question, tuple(str(c) for c in choices), parse_answer(answer, len(choices), where))


def item_from_json(record: dict[str, object]) -> Item:
    """Read back a `dataset.jsonl` line (the inverse of `Item.to_json`)."""
    choices = tuple(str(choice) for choice in record["choices"])  # type: ignore[union-attr]
    return Item(
        str(record["item_id"]),
        str(record["subject"]),
        str(record["question"]),
        choices,
        LETTERS.index(str(record["answer"])),
    )
