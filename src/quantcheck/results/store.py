"""The run folder on disk, written so that a run killed at any moment loses no finished work.

Per-item records are appended a batch at a time with flush + fsync; summary files are replaced
atomically (write a temporary file, fsync, rename). Readers ignore a torn last line, so a record
is either complete or absent.

Layout:
    run.json                  configuration and the identity of what was run (for resume checks)
    dataset.jsonl             the questions, as scored
    reference/key.json        what determines the reference's stored outputs
    reference/logprobs.npy    the reference's full next-token log-probabilities at the answer position
    models/<name>/quality.jsonl     per-item records (log-likelihood pass, token agreement)
    models/<name>/generation.jsonl  per-item generated answers
    models/<name>/<phase>.json      finished phase summaries (cost, load info) or <phase>.error.json
    results.json, items.jsonl, report.*   the merged outputs
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel

from quantcheck.errors import ResultsFolderError

Record = TypeVar("Record", bound=BaseModel)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_error(path: Path, error: OSError) -> ResultsFolderError:
    what = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return ResultsFolderError(f"cannot write {path}: {what}; finished work is kept, free space and run the same command to resume")


def write_bytes_atomic(path: Path, payload: bytes) -> Path:
    """Replace `path` so that readers see the old or the new file, never half of one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o644)  # mkstemp makes private files; results and reports are meant to be shared
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)
    except OSError as error:
        raise _write_error(path, error) from None
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload: BaseModel | dict) -> None:
    text = payload.model_dump_json(indent=2) if isinstance(payload, BaseModel) else json.dumps(payload, indent=2)
    write_text_atomic(path, text + "\n")


def append_records(path: Path, records: Iterable[BaseModel]) -> None:
    """Append whole lines in one write, then fsync: a batch is durable once this returns."""
    payload = "".join(record.model_dump_json() + "\n" for record in records)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise _write_error(path, error) from None


def read_records(path: Path, model: type[Record]) -> Iterator[Record]:
    """Complete records only: a torn last line from a killed run is skipped (it will be redone)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                return
            yield model.model_validate_json(line)


def read_latest_by_id(path: Path, model: type[Record], key: str = "item_id") -> dict[str, Record]:
    """Records keyed by item; a batch redone after a crash overrides its earlier partial copy."""
    return {getattr(record, key): record for record in read_records(path, model)}


class ReferenceLogprobs:
    """The reference's full-vocabulary log-probabilities, one row per item (llama.cpp's pass 1).

    Stored as float32 .npy (memory-mapped): items x vocab x 4 bytes, e.g. 166 x 49k = 33 MB.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, n_items: int, vocab_size: int) -> bool:
        """Make the file unless a complete one of this shape exists; True when its rows are new (empty)."""
        try:
            if np.load(self.path, mmap_mode="r").shape == (n_items, vocab_size):
                return False
        except (OSError, ValueError):  # absent, or cut short by a write error or a kill while it was created
            pass
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n_items, vocab_size)).flush()
        except OSError as error:
            raise _write_error(self.path, error) from None
        return True

    def write_rows(self, rows: list[int], values: np.ndarray) -> None:
        try:
            array = np.load(self.path, mmap_mode="r+")
            array[rows] = values
            array.flush()
        except OSError as error:
            raise _write_error(self.path, error) from None

    def read_rows(self, rows: list[int]) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r")[rows])
