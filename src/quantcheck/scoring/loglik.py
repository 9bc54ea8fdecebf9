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

from quantcheck.data.batching import plan_batches
from quantcheck.data.items import LETTERS, Item
from quantcheck.data.prompts import answer_continuations, loglik_prompt
from quantcheck.errors import QuantcheckError
from quantcheck.metrics.next_token import (
    TOP_K,
    KLBounds,
    exact_top_k,
    jaccard_all_k,
    kl_divergence,
    kl_from_top_k,
    kl_lower_bound,
    tail_log_mass,
    tail_samples,
    top_k_ids,
)
from quantcheck.schema.results import ItemRecord, LoglikAnswer
from quantcheck.storage.store import CompactStore, ReferenceStore


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
            raise QuantcheckError(
                f"the tokenizer splits {text!r} into {len(ids)} tokens; "
                "log-likelihood scoring needs one token per answer letter"
            )
        continuation_ids.append(ids[0])
    prompt_ids = [tokenizer.encode(loglik_prompt(item)) for item in items]
    joined = tokenizer.encode(loglik_prompt(items[0]) + answer_continuations(1)[0])
    if joined != prompt_ids[0] + continuation_ids[:1]:
        raise QuantcheckError(
            "the tokenizer merges the answer letter with the prompt; log-likelihood scoring cannot separate them"
        )
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


def compare_with_reference(
    store: ReferenceStore, rows: list[int], logprobs: torch.Tensor, top_logprobs: int | None = None
) -> tuple[KLBounds, torch.Tensor]:
    """KL against the stored rows and the reference's top 20 ids.

    Exact from the full store (bounds equal to it); from the compact store an estimate between
    bounds. Where either side is known only on its top K (`top_logprobs` for this model, the
    store's for the reference) all that is certain is a lower bound: estimate and lower are that
    bound and upper is infinite.
    """
    stored = store.read_rows(rows)
    if not isinstance(store, CompactStore):
        reference = torch.from_numpy(stored)
        if store.top_logprobs is None and top_logprobs is None:
            kl = kl_divergence(reference, logprobs)
            return KLBounds(kl, kl, kl), top_k_ids(reference, max(TOP_K))
        lower = kl_lower_bound(reference, logprobs, store.top_logprobs, top_logprobs)
        return KLBounds(lower, lower, torch.full_like(lower, torch.inf)), top_k_ids(reference, max(TOP_K))
    field = lambda name: torch.from_numpy(stored[name])  # noqa: E731
    top_ids = field("top_ids").long()
    if top_logprobs is not None:
        known = torch.full_like(logprobs, -torch.inf, dtype=torch.float32).scatter(-1, top_ids, field("top_logprobs"))
        lower = kl_lower_bound(known, logprobs, store.top_k, top_logprobs)
        return KLBounds(lower, lower, torch.full_like(lower, torch.inf)), top_ids[:, : max(TOP_K)]
    bounds = kl_from_top_k(
        top_ids,
        field("top_logprobs"),
        field("log_tail_mass"),
        field("sample_ids").long(),
        field("sample_logprobs"),
        logprobs,
    )
    return bounds, top_ids[:, : max(TOP_K)]


def reference_top(store: ReferenceStore) -> int | None:
    """How many of each reference row's entries are known exactly: the compact store's K, a server's K, None for full
    rows."""
    return store.top_k if isinstance(store, CompactStore) else store.top_logprobs


def kl_lower_bound_method(store: ReferenceStore, top_logprobs: int | None) -> str | None:
    """How KL is bounded when a side is known only on its top K, in words for results.json; None when it is not."""
    if top_logprobs is None and store.top_logprobs is None:
        return None
    sides = [
        f"the {side}'s top {top}"
        for side, top in (("reference", reference_top(store)), ("variant", top_logprobs))
        if top is not None
    ]
    return (
        f"lower bound from {' and '.join(sides)} log-probabilities "
        "(exact shared terms + log-sum inequality on the rest)"
    )


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
    top_logprobs: int | None = None,
) -> None:
    """Score every item not in `done`, one batch at a time, handing each finished batch to `on_batch`.

    `next_token_logprobs` is the backend's request (any engine). The reference writes its rows to the store `reference`
    (full or compact); a variant reads them back and adds KL (with bounds from the compact store), Jaccard@k and top-1
    agreement (only when it saw the identical token ids: `compare_tokens`). `top_logprobs` is None for full rows,
    K for a server's top-K rows (-inf elsewhere): KL is then a lower bound and Jaccard@k is kept for k <= K.
    """
    exact_ks = exact_top_k(None if is_reference else reference_top(reference), top_logprobs)
    bound = None if is_reference else kl_lower_bound_method(reference, top_logprobs)
    shown = min(max(TOP_K), top_logprobs or max(TOP_K))
    for rows, prompts in model_batches(encoded, batch_size):
        if all(items[row].item_id in done for row in rows):
            continue
        logprobs = torch.from_numpy(next_token_logprobs(prompts))
        if is_reference:
            reference.write_rows(rows, reference_rows(reference, rows, logprobs))
        top = top_k_ids(logprobs, max(TOP_K))[:, :shown]
        if not is_reference and compare_tokens:
            divergence, reference_ids = compare_with_reference(reference, rows, logprobs, top_logprobs)
            reference_ids = reference_ids.tolist()
        records = []
        for position, row in enumerate(rows):
            item = items[row]
            record = ItemRecord(
                item_id=item.item_id,
                model=model_name,
                answer=item.answer_letter,
                loglik=loglik_answer(
                    logprobs[position], encoded.continuation_ids[: len(item.choices)], item, top_logprobs
                ),
                topk_ids=top[position].tolist(),
                topk_logprobs=logprobs[position, top[position]].tolist(),
            )
            if not is_reference and compare_tokens:
                record.kl, record.kl_bound = float(divergence.estimate[position]), bound
                if isinstance(reference, CompactStore):
                    record.kl_lower, record.kl_upper = (
                        float(divergence.lower[position]),
                        finite_or_none(float(divergence.upper[position])),
                    )
                    if divergence.se is not None:  # None where the variant's side is a top-K lower bound
                        record.kl_se = finite_or_none(float(divergence.se[position]))
                record.jaccard = jaccard_all_k(reference_ids[position], record.topk_ids, exact_ks)
                record.top1_agree = reference_ids[position][0] == record.topk_ids[0]
            records.append(record)
        on_batch(records)


def finite_or_none(value: float) -> float | None:
    """An infinite bound is stored as None (JSON has no infinity): the variant gives a tail token probability 0."""
    return value if np.isfinite(value) else None


def loglik_answer(row: torch.Tensor, continuation_ids: list[int], item: Item, top_logprobs: int | None) -> LoglikAnswer:
    """The most likely answer letter. From a top-K row it is exact whenever one letter is among the K
    (an unlisted letter is less likely than every listed token); unlisted letters are recorded at the
    K-th log-probability, their upper bound."""
    choice_logprobs = row[continuation_ids]
    pred = int(torch.argmax(choice_logprobs))
    if top_logprobs is not None:
        listed = torch.isfinite(choice_logprobs)
        if not bool(listed.any()):
            raise QuantcheckError(
                f"no answer letter is among the top {top_logprobs} log-probabilities the server returned for "
                f"{item.item_id}: ask it for more (url:...?top_logprobs=N) or for the full vocabulary"
            )
        choice_logprobs = torch.where(listed, choice_logprobs, row[torch.isfinite(row)].min())
    return LoglikAnswer(pred=LETTERS[pred], correct=pred == item.answer, choice_logprobs=choice_logprobs.tolist())
