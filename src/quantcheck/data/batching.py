"""Turning token-id lists into padded batches, in a fixed plan that a resumed run reproduces."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped longest-first: little padding, and an out-of-memory shows up in the first batch.

    The plan depends only on the lengths and the batch size, so a resumed run recomputes exactly
    the batches it lost, with the same shapes, and gets bit-identical numbers on CPU.
    """
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def left_padded(sequences: list[list[int]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Left padding puts every sequence's last token at position -1; position ids skip the padding."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp_min(0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "position_ids": position_ids.to(device),
    }


def fixed_length_prompts(tokenizer, texts: Sequence[str], seq_len: int, count: int) -> list[list[int]]:
    """`count` prompts of exactly `seq_len` tokens (texts reused cyclically, ids repeated to length)."""
    prompts = []
    for index in range(count):
        ids = tokenizer.encode(texts[index % len(texts)]) or [tokenizer.eos_token_id]
        prompts.append((ids * (seq_len // len(ids) + 1))[:seq_len])
    return prompts
