"""Every token of sequences scored (a text's windows, or prompts with the reference's answers): one forward
per sequence, every statistic from its rows.

The reference's pass keeps its rows in the reference store (full or compact, one store row per
scored position, sequence after sequence) and each sequence's negative log-likelihoods; a variant's pass
reads the rows back for the identical token ids and adds per-token KL, top-1 agreement and
Jaccard@k (llama.cpp's two-pass protocol, with quantcheck's compact store in place of the 50x
larger full-vocabulary file). Delta-p and the perplexity ratio need only the two models' NLLs and
are computed in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from quantcheck.data.corpus import scored_positions
from quantcheck.metrics.next_token import TOP_K, exact_top_k, jaccard_at_k, top_k_ids
from quantcheck.schema.results import WindowRecord
from quantcheck.scoring.loglik import (
    compare_with_reference,
    finite_or_none,
    kl_lower_bound_method,
    reference_rows,
    reference_top,
)
from quantcheck.storage.store import CompactStore, ReferenceStore


def _batches(
    todo: list[int], sequences: Sequence[Sequence[int]], firsts: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Consecutive sequences of one length and start, up to `batch_size` per forward (a text's windows all share
    them)."""
    batches: list[list[int]] = []
    for index in todo:
        shape = (len(sequences[index]), firsts[index])
        if (
            batches
            and len(batches[-1]) < batch_size
            and (len(sequences[batches[-1][0]]), firsts[batches[-1][0]]) == shape
        ):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def score_windows(
    window_logprobs: Callable[[list[list[int]], int], np.ndarray],
    model_name: str,
    sequences: Sequence[Sequence[int]],
    firsts: Sequence[int],
    *,
    batch_size: int,
    reference: ReferenceStore,
    is_reference: bool,
    compare_tokens: bool,
    done: set[int],
    on_batch: Callable[[list[WindowRecord]], None],
    top_logprobs: int | None = None,
) -> None:
    """Score every sequence not in `done` from its `first` position on, handing each finished batch to `on_batch`.

    Sequence i's scored positions are store rows offsets[i] .. offsets[i+1]; a sequence with nothing to
    score (an empty answer) gets a record with empty lists.
    """
    offsets = np.cumsum(
        [0, *(scored_positions(sequence, first) for sequence, first in zip(sequences, firsts))]
    ).tolist()
    exact_ks = exact_top_k(None if is_reference else reference_top(reference), top_logprobs)
    bound = None if is_reference else kl_lower_bound_method(reference, top_logprobs)
    todo = [index for index in range(len(sequences)) if index not in done]
    for batch in _batches(todo, sequences, firsts, batch_size):
        first = firsts[batch[0]]
        scored = scored_positions(sequences[batch[0]], first)
        logprobs = window_logprobs([list(sequences[index]) for index in batch], first) if scored else None
        records = []
        for position, index in enumerate(batch):
            record = WindowRecord(window=index, model=model_name, nll=[])
            if not scored:
                records.append(record)
                continue
            rows = torch.from_numpy(np.ascontiguousarray(logprobs[position]))
            targets = torch.tensor(sequences[index][first + 1 :])
            record.nll = (-rows.gather(-1, targets[:, None])[:, 0]).tolist()
            store_index = list(range(offsets[index], offsets[index + 1]))
            if is_reference:
                reference.write_rows(store_index, reference_rows(reference, store_index, rows))
            elif compare_tokens:
                divergence, reference_ids = compare_with_reference(reference, store_index, rows, top_logprobs)
                own_ids = top_k_ids(rows, max(TOP_K)).tolist()
                reference_ids = reference_ids.tolist()
                record.kl, record.kl_bound = divergence.estimate.tolist(), bound
                if isinstance(reference, CompactStore):
                    record.kl_lower = divergence.lower.tolist()
                    record.kl_upper = [finite_or_none(value) for value in divergence.upper.tolist()]
                    if divergence.se is not None:  # None where the variant's side is a top-K lower bound
                        record.kl_se = [finite_or_none(value) for value in divergence.se.tolist()]
                record.top1_agree = [ref[0] == own[0] for ref, own in zip(reference_ids, own_ids)]
                record.jaccard = {
                    k: float(np.mean([jaccard_at_k(ref, own, k) for ref, own in zip(reference_ids, own_ids)]))
                    for k in exact_ks
                }
            records.append(record)
        on_batch(records)
