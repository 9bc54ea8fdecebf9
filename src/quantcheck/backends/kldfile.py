"""A reference read from a llama.cpp `llama-perplexity --kl-divergence-base` file instead of computed.

A user who already has such a file (the reference's log-probabilities at every scored token of a text)
compares variants against it without the reference model: `quantcheck run MODEL --reference-kld
BASE.kld --quant ...` (MODEL gives the tokenizer). The file's windows are the run's token ids, replayed
through every variant.

Format (llama.cpp tools/perplexity/perplexity.cpp): b"_logits_", uint32 n_ctx, int32 n_vocab, int32
n_chunk, int32 tokens[n_chunk * n_ctx]; then per chunk, per scored position (n_ctx/2 .. n_ctx-2), one
row of nv = 2*((n_vocab+1)/2) + 4 uint16: float32 scale and min_log_prob, then n_vocab uint16 q.

Decoded as llama.cpp's own reader decodes it (`log_softmax` for `--kl-divergence`): log p = scale * q +
min_log_prob in float32 for every q, q = 0 included (the writer clamps every token more than 16 nats below
the top to q = 0, so q = 0 is min_log_prob, finite). The scored token's negative log-likelihood is
-(scale * q + min_log_prob), whatever its q. llama.cpp's KL sums over the tokens whose decoded
log-probability is above -16 (an absolute test, `p_log_base > -16.f`), so every other token gets
probability 0 here, the scored token excepted (it keeps its decoded value, so that its NLL stays
llama.cpp's and finite; its mass is below e^-16). The rows are then renormalized (a log-softmax over what
is left) before use: the uint16 rounding and the dropped tokens leave their sum a little off 1, and every
bound here assumes a distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.data.corpus import KLD_PREFIX, TextCorpus, added_bos
from quantcheck.errors import QuantcheckError

if TYPE_CHECKING:
    from quantcheck.schema.results import EngineInfo, GenerationSettings, ModelCost

MAGIC = b"_logits_"
HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<u4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])


class KldFileError(QuantcheckError):
    """A file that is not a complete llama-perplexity base file."""


@dataclass(frozen=True)
class KldBase:
    """A llama-perplexity base file, its rows memory-mapped."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray  # [n_chunk, n_ctx] int32
    rows: np.ndarray  # [n_chunk * scored, nv] uint16

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored(self) -> int:
        return self.n_ctx - 1 - self.first

    def logprobs(self, chunk: int) -> np.ndarray:
        """float32 [scored, n_vocab]: one chunk's decoded, renormalized rows."""
        rows = self.rows[chunk * self.scored : (chunk + 1) * self.scored]
        scale, minimum = rows[:, :4].copy().view("<f4").T
        targets = self.tokens[chunk, self.first + 1 :]
        return decode_rows(scale, minimum, rows[:, 4 : 4 + self.n_vocab], targets)


EXCLUDED_LOG_PROB = -16.0  # llama.cpp's KL leaves out the base's tokens at or below this log-probability


def decode_rows(scale: np.ndarray, minimum: np.ndarray, levels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float32 [rows, n_vocab] log-probabilities from uint16 levels, as llama.cpp decodes them: scale * q +
    min_log_prob (float32, q = 0 included); tokens at or below -16 left out as llama.cpp's KL leaves them
    out, except each row's scored token (`targets`), then renormalized."""
    decoded = scale.astype(np.float32)[:, None] * levels.astype(np.float32) + minimum.astype(np.float32)[:, None]
    rows = np.arange(len(decoded))
    target_values = decoded[rows, targets].copy()
    decoded = np.where(decoded > np.float32(EXCLUDED_LOG_PROB), decoded, np.float32(-np.inf))
    decoded[rows, targets] = target_values
    from scipy.special import log_softmax  # imported where used: the parent reads the backends for their settings

    return log_softmax(decoded.astype(np.float64), axis=-1).astype(np.float32)


def read_kld_base(path: Path) -> KldBase:
    """Parse and check a base file: its magic, its header and that its size is exactly what they announce."""
    refuse = lambda problem: KldFileError(
        f"{path} is not a llama-perplexity --kl-divergence-base file ({problem}): "  # noqa: E731
        "write it again with llama-perplexity -m BASE.gguf -f TEXT --kl-divergence-base FILE"
    )
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype=HEADER, count=1)
    except OSError as error:
        raise KldFileError(f"{path}: cannot read the base file: {error.strerror}") from None
    if header.size == 0 or header["magic"][0] != MAGIC:
        raise refuse("it does not start with _logits_")
    n_ctx, n_vocab, n_chunk = (int(header[field][0]) for field in ("n_ctx", "n_vocab", "n_chunk"))
    if n_ctx < 4 or n_vocab <= 0 or n_chunk <= 0:
        raise refuse(f"its header says n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} chunks")
    width = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    expected = HEADER.itemsize + 4 * n_ctx * n_chunk + 2 * width * scored * n_chunk
    if size != expected:
        raise refuse(f"{size:,} bytes where its header announces {expected:,}: cut short or not one file")
    tokens = np.fromfile(path, dtype="<i4", count=n_ctx * n_chunk, offset=HEADER.itemsize).reshape(n_chunk, n_ctx)
    rows = np.memmap(
        path, dtype="<u2", mode="r", offset=HEADER.itemsize + 4 * n_ctx * n_chunk, shape=(scored * n_chunk, width)
    )
    return KldBase(path=path, n_ctx=n_ctx, n_vocab=n_vocab, tokens=tokens, rows=rows)


def recorded_corpus(spec: str, tokenizer_folder: Path, trust_remote_code: bool) -> TextCorpus:
    """A llama-perplexity base file's windows as text (their tokens decoded), for the report and the cost phase;
    the windows themselves are replayed as recorded."""
    from quantcheck.models.loading import load_tokenizer

    base = read_kld_base(Path(spec.removeprefix(KLD_PREFIX)))
    text = load_tokenizer(str(tokenizer_folder), trust_remote_code).decode(base.tokens.ravel().tolist())
    return TextCorpus(
        spec=spec,
        source=f"llama-perplexity base file {base.path} ({len(base.tokens)} windows of {base.n_ctx} tokens)",
        text=text,
    )


class KldFileBackend(Backend):
    """The reference as llama-perplexity recorded it: rows read, nothing run (no generation, no cost)."""

    name = "kldfile"
    engine_package = "numpy"
    install_hint = "pip install numpy"
    scores_text = True

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return {
            "none": MethodInfo(
                "none",
                "the reference's log-probabilities as a llama-perplexity base file recorded them",
                frozenset({"cpu", "cuda"}),
            )
        }

    def __init__(self, job) -> None:
        super().__init__(job)
        from quantcheck.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.spec.tokenizer or self.spec.weights, job.trust_remote_code)
        self.base: KldBase | None = None
        self._chunks: dict[tuple[int, ...], int] = {}

    def load(self) -> None:
        self.base = read_kld_base(Path(self.spec.weights))
        if len(self.tokenizer) > self.base.n_vocab:
            raise KldFileError(
                f"{self.spec.weights} was written by a model with {self.base.n_vocab:,} tokens, "
                "fewer than this tokenizer's "
                f"{len(self.tokenizer):,}: give the model whose tokenizer wrote it"
            )
        self._chunks = {tuple(window): chunk for chunk, window in enumerate(self.recorded_windows())}

    def recorded_windows(self) -> list[list[int]]:
        """The file's windows as the base model saw them: llama.cpp puts the beginning-of-sequence token first where the
        tokenizer adds one, and records the text's own first token."""
        bos = added_bos(self.tokenizer)
        windows = self.base.tokens.tolist()
        return [[bos, *window[1:]] for window in windows] if bos is not None else windows

    def describe(self) -> EngineInfo:
        from quantcheck.schema.results import EngineInfo

        return EngineInfo(
            engine="llama-perplexity base file",
            version="kl-divergence-base",
            compute_dtype="unknown",
            devices=[],
            parallel={"file": str(self.base.path), "n_ctx": self.base.n_ctx, "chunks": len(self.base.tokens)},
        )

    @property
    def vocab_width(self) -> int:
        return self.base.n_vocab

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        if first != self.base.first:
            raise KldFileError(f"the base file scores from position {self.base.first}, not {first}")
        return np.stack([self.base.logprobs(self._chunks[tuple(window)]) for window in windows])

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        raise KldFileError(
            "a llama-perplexity base file holds its text's windows only: run --reference-kld without --dataset"
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        raise KldFileError("a llama-perplexity base file cannot generate")

    def measure_cost(self, texts: Sequence[str], settings: object, on_step: Callable[[str], None]) -> ModelCost:
        raise KldFileError("a reference read from a llama-perplexity base file has no cost to measure")


BACKEND = KldFileBackend
