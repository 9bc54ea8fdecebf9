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
from quantcheck.metrics.next_token import TOP_K, jaccard_all_k, kl_divergence, top_k_ids
from quantcheck.results.schema import ItemRecord, LoglikAnswer
from quantcheck.results.store import ReferenceLogprobs


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


def score_items(
    next_token_logprobs: Callable[[list[list[int]]], np.ndarray],
    model_name: str,
    items: tuple[Item, ...],
    encoded: EncodedItems,
    *,
    batch_size: int,
    reference: ReferenceLogprobs,
    is_reference: bool,
    compare_tokens: bool,
    done: set[str],
    on_batch: Callable[[list[ItemRecord]], None],
) -> None:
    """Score every item not in `done`, one batch at a time, handing each finished batch to `on_batch`.

    `next_token_logprobs` is the backend's request (any engine). The reference writes its log-probability rows to `reference`; a variant reads them back and
    adds KL, Jaccard@k and top-1 agreement (only when it saw the identical token ids: `compare_tokens`).
    """
    for rows, prompts in model_batches(encoded, batch_size):
        if all(items[row].item_id in done for row in rows):
            continue
        logprobs = torch.from_numpy(next_token_logprobs(prompts))
        if is_reference:
            reference.write_rows(rows, logprobs.numpy())
        top = top_k_ids(logprobs, max(TOP_K))
        if not is_reference and compare_tokens:
            reference_logprobs = torch.from_numpy(reference.read_rows(rows))
            kl = kl_divergence(reference_logprobs, logprobs).tolist()
            reference_top = top_k_ids(reference_logprobs, max(TOP_K)).tolist()
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
                record.kl = kl[position]
                record.jaccard = jaccard_all_k(reference_top[position], record.topk_ids)
                record.top1_agree = reference_top[position][0] == record.topk_ids[0]
            records.append(record)
        on_batch(records)
