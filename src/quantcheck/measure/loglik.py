"""The one forward pass per item that every quality number comes from.

For each question the model sees the MMLU prompt up to "Answer:" and we keep the next-token
log-probabilities at that position. From that single vector come the multiple-choice answer (the
most likely of " A".." D", lm-eval style, no text parsing), the top-20 token ids, and, for a
variant, KL / Jaccard / top-1 agreement against the reference's stored vector for the same token
ids (llama.cpp's two-pass protocol). Nothing is recomputed per metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from quantcheck.data.items import LETTERS, Item
from quantcheck.data.prompts import answer_continuations, loglik_prompt
from quantcheck.errors import QuantcheckError
from quantcheck.measure.batching import plan_batches
from quantcheck.metrics.next_token import TOP_K, KLBounds, jaccard_all_k, kl_divergence, kl_from_top_k, tail_log_mass, tail_samples, top_k_ids
from quantcheck.results.schema import ItemRecord, LoglikAnswer
from quantcheck.results.store import CompactStore, ReferenceStore


@dataclass(frozen=True)
class EncodedItems:
    """Token ids of every prompt and of the answer continuations, for one tokenizer."""

    prompt_ids: list[list[int]]
    continuation_ids: list[int]


def encode_items(tokenizer, items: tuple[Item, ...]) -> EncodedItems:
    """Tokenize prompts and check that " A".." D" are single tokens that extend the prompt cleanly."""
    n_choices = max(len(item.choices) for item in items)
    continuation_ids = []
    for text in answer_continuations(n_choices):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise QuantcheckError(f"the tokenizer splits {text!r} into {len(ids)} tokens; log-likelihood scoring needs one token per answer letter")
        continuation_ids.append(ids[0])
    prompt_ids = [tokenizer.encode(loglik_prompt(item)) for item in items]
    joined = tokenizer.encode(loglik_prompt(items[0]) + answer_continuations(1)[0])
    if joined != prompt_ids[0] + continuation_ids[:1]:
        raise QuantcheckError("the tokenizer merges the answer letter with the prompt; log-likelihood scoring cannot separate them")
    return EncodedItems(prompt_ids, continuation_ids)


def model_batches(encoded: EncodedItems, batch_size: int) -> Iterator[tuple[list[int], list[list[int]]]]:
    """The fixed batch plan with each batch's token-id prompts: shared by the scorer and the overhead benchmark."""
    for rows in plan_batches([len(ids) for ids in encoded.prompt_ids], batch_size):
        yield rows, [encoded.prompt_ids[row] for row in rows]


def reference_rows(store: ReferenceStore, rows: list[int], logprobs: torch.Tensor) -> np.ndarray:
    """What the store keeps of the reference's rows: all of them, or the compact form (tail draws seeded by item)."""
    if not isinstance(store, CompactStore):
        return logprobs.numpy()
    top = top_k_ids(logprobs, store.top_k)
    samples = tail_samples(logprobs, top, store.tail_samples, seeds=rows)
    kept = np.zeros(len(rows), dtype=store.row_dtype())
    kept["top_ids"], kept["top_logprobs"] = top.numpy(), logprobs.gather(-1, top).numpy()
    kept["log_tail_mass"] = tail_log_mass(logprobs, top).numpy()
    kept["sample_ids"], kept["sample_logprobs"] = samples.numpy(), logprobs.gather(-1, samples).numpy()
    return kept


def compare_with_reference(store: ReferenceStore, rows: list[int], logprobs: torch.Tensor) -> tuple[KLBounds, torch.Tensor]:
    """KL against the stored rows (exact from the full store: bounds equal to it) and the reference's top 20 ids."""
    stored = store.read_rows(rows)
    if not isinstance(store, CompactStore):
        reference = torch.from_numpy(stored)
        kl = kl_divergence(reference, logprobs)
        return KLBounds(kl, kl, kl), top_k_ids(reference, max(TOP_K))
    field = lambda name: torch.from_numpy(stored[name])  # noqa: E731
    bounds = kl_from_top_k(field("top_ids").long(), field("top_logprobs"), field("log_tail_mass"), field("sample_ids").long(),
                           field("sample_logprobs"), logprobs)
    return bounds, field("top_ids")[:, : max(TOP_K)]


def score_items(
    next_token_logprobs: Callable[[list[list[int]]], np.ndarray],
    model_name: str,
    items: tuple[Item, ...],
    encoded: EncodedItems,
    *,
    batch_size: int,
    reference: ReferenceStore,
    is_reference: bool,
    compare_tokens: bool,
    done: set[str],
    on_batch: Callable[[list[ItemRecord]], None],
) -> None:
    """Score every item not in `done`, one batch at a time, handing each finished batch to `on_batch`.

    `next_token_logprobs` is the backend's request (any engine). The reference writes its rows to the store `reference`
    (full or compact); a variant reads them back and adds KL (with bounds from the compact store), Jaccard@k and top-1
    agreement (only when it saw the identical token ids: `compare_tokens`).
    """
    for rows, prompts in model_batches(encoded, batch_size):
        if all(items[row].item_id in done for row in rows):
            continue
        logprobs = torch.from_numpy(next_token_logprobs(prompts))
        if is_reference:
            reference.write_rows(rows, reference_rows(reference, rows, logprobs))
        top = top_k_ids(logprobs, max(TOP_K))
        if not is_reference and compare_tokens:
            divergence, reference_top = compare_with_reference(reference, rows, logprobs)
            reference_top = reference_top.tolist()
        records = []
        for position, row in enumerate(rows):
            item = items[row]
            choice_logprobs = logprobs[position, encoded.continuation_ids[: len(item.choices)]]
            pred = int(torch.argmax(choice_logprobs))
            record = ItemRecord(
                item_id=item.item_id,
                model=model_name,
                answer=item.answer_letter,
                loglik=LoglikAnswer(pred=LETTERS[pred], correct=pred == item.answer, choice_logprobs=choice_logprobs.tolist()),
                topk_ids=top[position].tolist(),
                topk_logprobs=logprobs[position, top[position]].tolist(),
            )
            if not is_reference and compare_tokens:
                record.kl = float(divergence.estimate[position])
                if isinstance(reference, CompactStore):
                    record.kl_lower, record.kl_upper = float(divergence.lower[position]), _finite(float(divergence.upper[position]))
                record.jaccard = jaccard_all_k(reference_top[position], record.topk_ids)
                record.top1_agree = reference_top[position][0] == record.topk_ids[0]
            records.append(record)
        on_batch(records)


def _finite(value: float) -> float | None:
    """An infinite bound is stored as None (JSON has no infinity): the variant gives a tail token probability 0."""
    return value if np.isfinite(value) else None
