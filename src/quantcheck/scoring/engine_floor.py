"""An engine's own numeric noise: one model scored twice by the engine that runs it, with two batch plans.

The noise that counts is that of the engine scoring the variant, not only the reference's: transformers in fp32
moves a log-probability by about 1e-8 nats with the batch plan, in bf16 by 1e-3 to 1e-2, vLLM's bf16 on CPU by up to
0.21. Each model measures its own inside its quality job, with the engine already loaded, on a bounded subset: the
first `FLOOR_QUESTIONS` questions (the data set is already a seeded sample), scored `FLOOR_BATCH` at a time (fewer
where the run's batch size is smaller) and then one at a time; or the first `FLOOR_SEQUENCES` windows or prompts,
together (a prompt beside a copy of itself) and then alone; compared row by row over the full vocabulary. A model
known only by its top K log-probabilities (a capped server) has no full row to compare: not measured. llama.cpp
evaluates every sequence on its own in both plans, so its floor shows run-to-run noise only, not batching's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from quantcheck.schema.results import NumericFloor

FLOOR_QUESTIONS = 32
FLOOR_SEQUENCES = 4
FLOOR_BATCH = 8


def _divergence(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KL(first || second) over the last axis (log-probability rows) and whether the rows' most likely tokens agree.
    Entries where either side is -inf (a token an engine masks, or vocabulary padding) are left out."""
    first, second = first.astype(np.float64), second.astype(np.float64)
    finite = np.isfinite(first) & np.isfinite(second)
    terms = np.exp(np.where(finite, first, -np.inf)) * np.where(finite, first - second, 0.0)
    return np.clip(terms.sum(axis=-1), 0.0, None), first.argmax(axis=-1) == second.argmax(axis=-1)


def floor_batch(run_batch_size: int) -> int:
    """The batched plan's size: FLOOR_BATCH, or the run's own batch size where that is smaller (memory), at least 2."""
    return max(2, min(FLOOR_BATCH, run_batch_size))


def _floor(kl: np.ndarray, top1: np.ndarray, units: int, batch: int, model: str) -> NumericFloor:
    return NumericFloor(
        n=units,
        batch_size=batch,
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(top1.mean()),
        model=model,
    )


def question_floor(
    next_token_logprobs: Callable[[Sequence[Sequence[int]]], np.ndarray],
    prompts: Sequence[Sequence[int]],
    model: str,
    batch: int,
) -> NumericFloor:
    """The first FLOOR_QUESTIONS prompts' next-token rows, `batch` at a time against one at a time in reverse order."""
    subset = list(prompts[:FLOOR_QUESTIONS])
    together = np.concatenate(
        [next_token_logprobs(subset[start : start + batch]) for start in range(0, len(subset), batch)]
    )
    alone = np.stack([next_token_logprobs([prompt])[0] for prompt in reversed(subset)])[::-1]
    kl, top1 = _divergence(together, alone)
    return _floor(kl, top1, len(subset), batch, model)


def sequence_floor(
    window_logprobs: Callable[[Sequence[Sequence[int]], int], np.ndarray],
    sequences: Sequence[Sequence[int]],
    firsts: Sequence[int],
    model: str,
) -> NumericFloor | None:
    """The first FLOOR_SEQUENCES sequences with tokens to score, each in a batch (with the chosen ones of its shape, a
    text's windows; or beside a copy of itself, a prompt of its own length) against alone; mean KL over their tokens.
    None when no sequence has a token to score (every answer empty)."""
    chosen = [index for index, (sequence, first) in enumerate(zip(sequences, firsts)) if len(sequence) - first - 1 > 0]
    chosen = chosen[:FLOOR_SEQUENCES]
    if not chosen:
        return None
    shapes: dict[tuple[int, int], list[int]] = {}
    for index in chosen:
        shapes.setdefault((len(sequences[index]), firsts[index]), []).append(index)
    kl, top1, largest = [], [], 0
    for (_, first), group in shapes.items():
        batch = [list(sequences[index]) for index in group]
        batch = batch if len(batch) > 1 else batch * 2
        largest = max(largest, len(batch))
        together = window_logprobs(batch, first)
        for position, sequence in enumerate(batch[: len(group)]):
            divergence, agree = _divergence(together[position], window_logprobs([sequence], first)[0])
            kl.append(divergence)
            top1.append(agree)
    return _floor(np.concatenate(kl), np.concatenate(top1), len(chosen), largest, model)
