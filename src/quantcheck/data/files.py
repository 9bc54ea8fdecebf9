"""User data files: MMLU-layout CSV and JSONL, validated line by line.

JSONL schema, one object per line:
    {"question": str, "choices": [str, ...] (2-10), "answer": "B" or 1 (0-based),
     "id": str (optional), "subject": str (optional)}
CSV: MMLU's own layout without header, `question,A,B,C,D,answer` (answer a letter); an optional
header line of exactly those names is skipped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from quantcheck.data.items import Item, make_item
from quantcheck.errors import DatasetError

_CSV_HEADER = ["question", "a", "b", "c", "d", "answer"]


def read_csv(path: Path, subject: str, id_prefix: str) -> list[Item]:
    items = []
    with _open(path) as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            where = f"{path}:{line_number}"
            if line_number == 1 and [cell.strip().lower() for cell in row] == _CSV_HEADER:
                continue
            if not row:
                continue
            if len(row) < 3:
                raise DatasetError(f"{where}: expected question, choices and answer columns, got {len(row)} column(s)")
            item_id = f"{id_prefix}-{len(items):04d}"
            items.append(make_item(item_id, subject, row[0], list(row[1:-1]), row[-1], where))
    return items


def json_lines(lines: Iterable[str], path: Path | str, hint: str = "") -> Iterator[tuple[int, str, object]]:
    """(line number, "FILE:LINE", value) of each non-blank JSONL line; a line that is not JSON is a one-line
    error naming it (`hint` says what a line should hold)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{where}: not valid JSON ({error.msg}){hint}") from None
        yield number, where, value


def read_jsonl(path: Path) -> list[Item]:
    items = []
    with _open(path) as handle:
        for line_number, where, record in json_lines(handle, path):
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected an object with question, choices, answer")
            missing = [key for key in ("question", "choices", "answer") if key not in record]
            if missing:
                raise DatasetError(f"{where}: missing {', '.join(missing)}")
            if not isinstance(record["choices"], list):
                raise DatasetError(f"{where}: choices must be a list of strings")
            item_id = str(record.get("id", f"{path.stem}-{line_number:04d}"))
            subject = str(record.get("subject", path.stem))
            items.append(make_item(item_id, subject, record["question"], record["choices"], record["answer"], where))
    if len({item.item_id for item in items}) != len(items):
        raise DatasetError(f"{path}: ids are not unique")
    return items


def read_file(path: Path) -> list[Item]:
    if path.suffix.lower() == ".csv":
        return read_csv(path, subject=path.stem.removesuffix("_test"), id_prefix=path.stem)
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(path)
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .csv (MMLU layout) or .jsonl")


def read_text(path: Path) -> str:
    """A whole UTF-8 file; an unreadable or non-UTF-8 one is a one-line error naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start}): convert it to UTF-8") from None
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from None


def _open(path: Path):
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from None
