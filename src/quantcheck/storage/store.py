"""The run folder on disk, written so that a run killed at any moment loses no finished work.

Per-item records are appended a batch at a time with flush + fsync; summary files are replaced
atomically (write a temporary file, fsync, rename). Readers ignore a torn last line, so a record
is either complete or absent.

Layout:
    run.json                  configuration and the identity of what was run (for resume checks)
    dataset.jsonl             the questions, as scored
    corpus.txt                ... or the text corpus (--dataset text:FILE), as read
    reference/key.json        what determines the reference's stored outputs (the store's kind and size too)
    reference/tokens.json     the token ids every model is scored on (prompts, or a corpus's windows)
    reference/compact.npy     the reference's next-token rows at the answer position (a corpus: every scored token):
                              top K + tail (default)
    reference/logprobs.npy    ... or every log-probability (--store full)
    models/<name>/quality.jsonl     per-item records (log-likelihood pass, token agreement)
    models/<name>/generation.jsonl  per-item generated answers
    models/<name>/corpus.jsonl      per-window records of a text corpus (NLL, KL, top-1 per token)
    models/<name>/<phase>.json      finished phase summaries (cost, load info) or <phase>.error.json
    results.json, items.jsonl, report.*   the merged outputs
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantcheck.errors import QuantcheckError, ResultsFolderError

Record = TypeVar("Record", bound=BaseModel)


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""A full disk, a file larger than the process may write (ulimit -f), or a full quota: the same advice for each."""


def _write_error(path: Path, error: OSError, needed: int | None = None) -> ResultsFolderError:
    if error.errno in NO_SPACE:
        what = "the disk is full" if error.errno == errno.ENOSPC else f"no room for it ({os.strerror(error.errno)})"
        if needed is not None:
            what = f"it needs {needed / 2**20:.1f} MiB and {what}"
    else:
        what = error.strerror or str(error)
    return ResultsFolderError(
        f"cannot write {path}: {what}; finished work is kept, free space and run the same command to resume"
    )


def _cut_torn_line(path: Path) -> None:
    """A write cut short (a full disk, a killed run) leaves a last line without its newline; the next append would
    join onto it and make one unreadable line, so it is cut first (its batch is redone)."""
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            end = start
        handle.truncate(0)


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
        if path.exists():
            _cut_torn_line(path)
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


class StoreSettings(BaseModel):
    """What the reference keeps of each next-token row: recorded in the reference key, so a change recomputes."""

    model_config = ConfigDict(extra="forbid")  # also the [store] table of a config file
    kind: Literal["compact", "full"] = Field(
        "compact",
        description="what the reference keeps per question: compact (top K + tail sample, KL estimated with bounds) or "
        "full (every log-probability, exact KL)",
    )
    top_k: int = Field(  # Jaccard@20 needs the reference's top 20
        64, ge=20, description="compact store: the reference's most likely tokens kept exactly (at least 20)"
    )
    tail_samples: int = Field(
        128, ge=1, description="compact store: tail tokens kept, drawn in proportion to their probability"
    )

    def key(self) -> dict[str, object]:
        """What identifies the stored rows: K and S matter to the compact store only."""
        return self.model_dump(include={"kind"} if self.kind == "full" else None)


class ReferenceStore(ABC):
    """The reference's next-token rows, one per item (llama.cpp's pass 1): written once, read by every variant.

    One memory-mapped .npy. It is created under a temporary name and renamed, so a file at the
    final path was complete when made: one that is cut short or holds other rows is refused, never
    silently reread.
    """

    kind: ClassVar[str]
    file_name: ClassVar[str]

    def __init__(self, folder: Path) -> None:
        self.path = folder / self.file_name

    @abstractmethod
    def row_dtype(self) -> np.dtype:
        """The numpy type of one item's row."""

    def row_shape(self, vocab_size: int) -> tuple[int, ...]:
        return ()

    def bytes_per_row(self, vocab_size: int) -> int:
        return self.row_dtype().itemsize * int(np.prod(self.row_shape(vocab_size), dtype=np.int64))

    def check(self, n_items: int, vocab_size: int | None = None) -> None:
        """Refuse a file that is cut short or is not this store's (another kind, size or data set).

        Without `vocab_size` (the parent, before any model loads) the row width is not checked.
        """
        if not self.path.exists():
            return
        try:
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError):
            problem = "it is cut short or unreadable"
        else:
            row_shape = self.row_shape(vocab_size or 0)
            if (
                array.dtype == self.row_dtype()
                and array.ndim == 1 + len(row_shape)
                and array.shape[0] == n_items
                and (vocab_size is None or array.shape[1:] == row_shape)
            ):
                return
            problem = (
                f"it holds {array.shape} rows of {array.dtype}; this run needs {n_items} rows of {self.describe_row()}"
            )
        raise ResultsFolderError(
            f"{self.path} is not this run's {self.kind} reference store ({problem}): "
            f"delete the folder {self.path.parent} and run the same command again to score the reference afresh"
        )

    @abstractmethod
    def describe_row(self) -> str:
        """One item's row in words, for the message that refuses a foreign file."""

    @property
    def top_logprobs(self) -> int | None:
        """None: the reference's rows were full; K: known only on their top K (a server's cap)."""
        return None

    def create(self, n_items: int, vocab_size: int, top_logprobs: int | None = None) -> bool:
        """Make the file unless this run's exists (checked); True when its rows are new (empty)."""
        if self.path.exists():
            self.check(n_items, vocab_size)
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(descriptor)
            try:
                np.lib.format.open_memmap(
                    temporary, mode="w+", dtype=self.row_dtype(), shape=(n_items, *self.row_shape(vocab_size))
                ).flush()
                needed = Path(temporary).stat().st_size
                with open(temporary, "rb+") as handle:  # a sparse file would die of SIGBUS on a full disk later
                    os.posix_fallocate(handle.fileno(), 0, needed)
                os.chmod(temporary, 0o644)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            _fsync_directory(self.path.parent)
        except OSError as error:
            raise _write_error(self.path, error, self.bytes_per_row(vocab_size) * n_items) from None
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


class FullStore(ReferenceStore):
    """Every log-probability as float32: items x vocab x 4 bytes (166 x 49k = 33 MB; MMLU on 128k: 7 GB).

    A reference behind a server that returns only its top K log-probabilities is stored with -inf
    outside them, and K is kept beside the rows, since variants need it to bound KL.
    """

    kind = "full"
    file_name = "logprobs.npy"

    @property
    def _coverage_file(self) -> Path:
        return self.path.with_suffix(".json")

    @functools.cached_property
    def top_logprobs(self) -> int | None:
        """Read once: a variant asks for it at every batch."""
        if not self._coverage_file.exists():
            return None
        return json.loads(self._coverage_file.read_text())["top_logprobs"]

    def create(self, n_items: int, vocab_size: int, top_logprobs: int | None = None) -> bool:
        created = super().create(n_items, vocab_size)
        if created or not self._coverage_file.exists():
            write_json_atomic(self._coverage_file, {"top_logprobs": top_logprobs})
            self.__dict__.pop("top_logprobs", None)  # read afresh after this write
        return created

    def row_dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def row_shape(self, vocab_size: int) -> tuple[int, ...]:
        return (vocab_size,)

    def describe_row(self) -> str:
        return "float32 x vocabulary"


class CompactStore(ReferenceStore):
    """Per item: the top K ids (int32) and log-probabilities (float32), the log of the mass outside
    them (float64), and S tail tokens drawn in proportion to p (ids, log-probabilities). K=64, S=128:
    1,544 bytes whatever the vocabulary (`metrics.next_token.kl_from_top_k` says how KL comes from it).
    """

    kind = "compact"
    file_name = "compact.npy"

    def __init__(self, folder: Path, top_k: int, tail_samples: int) -> None:
        super().__init__(folder)
        self.top_k = top_k
        self.tail_samples = tail_samples

    def row_dtype(self) -> np.dtype:
        return np.dtype(
            [
                ("top_ids", "<i4", (self.top_k,)),
                ("top_logprobs", "<f4", (self.top_k,)),
                ("log_tail_mass", "<f8"),
                ("sample_ids", "<i4", (self.tail_samples,)),
                ("sample_logprobs", "<f4", (self.tail_samples,)),
            ]
        )

    def describe_row(self) -> str:
        return f"top {self.top_k} + {self.tail_samples} tail samples"

    def create(self, n_items: int, vocab_size: int, top_logprobs: int | None = None) -> bool:
        if top_logprobs is not None:
            raise QuantcheckError(refuse_top_k_reference(top_logprobs))
        if self.top_k >= vocab_size:
            raise QuantcheckError(
                f"--store-top-k {self.top_k} leaves no tail in a vocabulary of {vocab_size}: "
                "choose a smaller one, or --store full"
            )
        return super().create(n_items, vocab_size)


def refuse_top_k_reference(top_logprobs: int, every_token: bool = False) -> str:
    """Why a reference known only on its top K cannot fill the compact store (it needs the tail), and what to do; at
    every token of a text, K is what the run asks for (`prompt_logprobs`, 20 unless all)."""
    ask = (
        "ask for all of them (--reference-url URL?prompt_logprobs=all)"
        if every_token
        else ("serve the reference with all of them (vLLM: --max-logprobs -1)")
    )
    return (
        f"the reference's server returns only its top {top_logprobs} log-probabilities, and the compact reference "
        f"store needs full rows: {ask}, or run with --store full"
    )


def open_reference_store(folder: Path, settings: StoreSettings) -> ReferenceStore:
    """The store the settings name, in the reference folder."""
    if settings.kind == "full":
        return FullStore(folder)
    return CompactStore(folder, settings.top_k, settings.tail_samples)
