"""transformers' side of the cost scenario: latency inputs (`batch_inputs`) and generation throughput at a fixed
output length, so that every model produces the same work.

Greedy, `min_new_tokens == max_new_tokens`, identical prompts for every model, and an explicit
GenerationConfig: a model's own generation_config.json (temperature, repetition penalty, ...) is
swapped out during the measurement so none of its defaults can leak in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from quantcheck.cost.contention import other_load
from quantcheck.cost.memory import PeakMemoryTracker, tracking
from quantcheck.cost.timing import Clock
from quantcheck.schema.results import GenerationCost

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def batch_inputs(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int, seq_len: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """`batch_size` texts (reused cyclically), each padded or truncated to exactly `seq_len` tokens."""
    if not texts:
        raise ValueError("latency needs at least one text")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (load_tokenizer does)")
    batch = [texts[i % len(texts)] for i in range(batch_size)]
    encoded = tokenizer(batch, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def explicit_generation_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    do_sample: bool,
    temperature: float,
    max_new_tokens: int,
    stop_token_ids: Sequence[int],
    min_new_tokens: int | None = None,
) -> GenerationConfig:
    """The one GenerationConfig builder: every decoding knob set explicitly, for scoring and for cost.

    Used together with `neutral_generation_defaults`: transformers 5.x fills fields left None from
    the model's own generation_config (repetition_penalty, top_k, ...) and 4.50-4.57 overwrite
    fields equal to their defaults, so neither may be left to the model. `stop_token_ids` is the
    model's whole list of stop tokens (Llama-3, Gemma and Phi-3 chat stop on an end-of-turn token),
    not the tokenizer's single eos.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=do_sample,
        num_beams=1,
        temperature=temperature if do_sample else 1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        min_new_tokens=min_new_tokens or 0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(stop_token_ids),
        bos_token_id=tokenizer.bos_token_id,
    )


def fixed_length_config(tokenizer: PreTrainedTokenizerBase, new_tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly `new_tokens` tokens (the cost measurement's like-for-like work)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return explicit_generation_config(
        tokenizer,
        do_sample=False,
        temperature=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        stop_token_ids=stops,
    )


@contextmanager
def neutral_generation_defaults(model: PreTrainedModel) -> Iterator[None]:
    """Hide the model's generation_config: transformers fills every unset field from it otherwise."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def prompt_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    prompts: int,
    batch_size: int,
    max_prompt_tokens: int | None,
    device: torch.device,
) -> list[dict[str, torch.Tensor]]:
    """`prompts` texts in batches, left-padded (decoder-only models continue on the right).

    Texts are reused cyclically when a data set has fewer questions than generation prompts
    (`--limit 3` with CUDA's 4 prompts), as the latency sweep does: the work stays the same size.
    """
    if not texts:
        raise ValueError("generation needs at least one text")
    batches = []
    for start in range(0, prompts, batch_size):
        chunk = [texts[index % len(texts)] for index in range(start, min(start + batch_size, prompts))]
        encoded = tokenizer(
            chunk,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            truncation=max_prompt_tokens is not None,
            max_length=max_prompt_tokens,
        )
        batches.append(
            {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
        )
    return batches


def measure_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    prompts: int = 4,
    new_tokens: int = 32,
    batch_size: int = 1,
    max_prompt_tokens: int | None = None,
    tracker: PeakMemoryTracker | None = None,
) -> GenerationCost:
    """Prefill, time to first token and decode rate of greedy fixed-length generation.

    Per batch of prompts: `prefill_s` is one forward over the prompt (building the KV cache);
    `time_to_first_token_s` is `generate` with one new token; the decode rate divides the remaining
    `new_tokens - 1` tokens per sequence by (full generate time - time to first token), so generate's
    own setup cost cancels out. One untimed warm-up generate runs first.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to separate decoding from the first token")
    clock = Clock(model.device)
    batches = prompt_batches(tokenizer, texts, prompts, batch_size, max_prompt_tokens, model.device)
    full, first = fixed_length_config(tokenizer, new_tokens), fixed_length_config(tokenizer, 1)
    prefill: list[float] = []
    first_token: list[float] = []
    total: list[float] = []
    decoded: list[int] = []
    sequences = 0
    with (
        tracking(model.device, tracker) as tracker,
        tracker.phase("generation") as phase,
        other_load() as others,
        neutral_generation_defaults(model),
        torch.no_grad(),
    ):
        model.generate(**batches[0], generation_config=full)
        for inputs in batches:
            begin = clock.now()
            model(**inputs, use_cache=True)
            prefill.append(clock.since(begin))
            begin = clock.now()
            model.generate(**inputs, generation_config=first)
            first_token.append(clock.since(begin))
            begin = clock.now()
            output = model.generate(**inputs, generation_config=full)
            total.append(clock.since(begin))
            generated = output.shape[1] - inputs["input_ids"].shape[1]
            if generated != new_tokens:
                raise RuntimeError(f"generate produced {generated} new tokens instead of {new_tokens}")
            sequences += output.shape[0]
            decoded.append(output.shape[0] * (new_tokens - 1))
    decode_time = sum(total) - sum(first_token)
    if decode_time <= 0:
        raise RuntimeError("decoding took no measurable time (full generate was not slower than one token)")
    return GenerationCost(
        prompts=prompts,
        new_tokens=new_tokens,
        prefill_s=sum(prefill) / len(prefill),
        time_to_first_token_s=sum(first_token) / len(first_token),
        decode_tokens_per_s=sequences * (new_tokens - 1) / decode_time,
        tokens_per_s=sequences * new_tokens / sum(total),
        peak_memory_bytes=phase.peak_bytes,
        decode_times_s=[whole - one for whole, one in zip(total, first_token)],
        decode_tokens=decoded,
        **others.fields(model.device),
    )
