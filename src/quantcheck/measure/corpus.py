"""A text corpus scored at every token: one forward per window, every statistic from its rows.

The reference's pass keeps its rows in the reference store (full or compact, one store row per
scored position: window x position) and each window's negative log-likelihoods; a variant's pass
reads the rows back for the identical token ids and adds per-token KL, top-1 agreement and
Jaccard@k (llama.cpp's two-pass protocol, with quantcheck's compact store in place of the 50x
larger full-vocabulary file). Delta-p and the perplexity ratio need only the two models' NLLs and
are computed in the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from quantcheck.measure.loglik import finite_or_none, compare_with_reference, kl_lower_bound_method, reference_rows, reference_top
from quantcheck.metrics.next_token import TOP_K, exact_top_k, jaccard_at_k, top_k_ids
from quantcheck.results.schema import WindowRecord
from quantcheck.results.store import CompactStore, ReferenceStore


def store_rows(window: int, scored: int) -> list[int]:
    """The store rows of one window's scored positions."""
    return list(range(window * scored, (window + 1) * scored))


def score_windows(
    window_logprobs: Callable[[list[list[int]], int], np.ndarray],
    model_name: str,
    windows: Sequence[Sequence[int]],
    first: int,
    *,
    batch_size: int,
    reference: ReferenceStore,
    is_reference: bool,
    compare_tokens: bool,
    done: set[int],
    on_batch: Callable[[list[WindowRecord]], None],
    top_logprobs: int | None = None,
) -> None:
    """Score every window not in `done`, `batch_size` windows per forward, handing each finished batch to `on_batch`."""
    scored = len(windows[0]) - first - 1
    exact_ks = exact_top_k(None if is_reference else reference_top(reference), top_logprobs)
    bound = None if is_reference else kl_lower_bound_method(reference, top_logprobs)
    todo = [index for index in range(len(windows)) if index not in done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        logprobs = window_logprobs([list(windows[index]) for index in batch], first)
        records = []
        for position, index in enumerate(batch):
            rows = torch.from_numpy(np.ascontiguousarray(logprobs[position]))
            targets = torch.tensor(windows[index][first + 1 :])
            record = WindowRecord(window=index, model=model_name, nll=(-rows.gather(-1, targets[:, None])[:, 0]).tolist())
            store_index = store_rows(index, scored)
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
                record.top1_agree = [ref[0] == own[0] for ref, own in zip(reference_ids, own_ids)]
                record.jaccard = {k: float(np.mean([jaccard_at_k(ref, own, k) for ref, own in zip(reference_ids, own_ids)]))
                                  for k in exact_ks}
            records.append(record)
        on_batch(records)
