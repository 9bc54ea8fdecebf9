"""Free-generation multiple choice: the original experiment's benchmark, done soundly.

Every model gets the same explicit decoding settings (never its own generation_config defaults),
a fixed seed per batch (so a resumed run reproduces the same samples), and its answer is parsed
from the text; an unparsable answer is kept as its own category instead of silently counting as
a wrong letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from quantcheck.data.items import LETTERS, Item
from quantcheck.data.prompts import GENERATION_INSTRUCTION, generation_prompt
from quantcheck.errors import QuantcheckError
from quantcheck.measure.batching import left_padded, plan_batches
from quantcheck.metrics.answers import extract_choice
from quantcheck.results.schema import GeneratedAnswer, GenerationSettings, ItemRecord


def resolve_settings(tokenizer, chat: str, temperature: float, greedy: bool, max_new_tokens: int, seed: int) -> GenerationSettings:
    """`chat` is auto|on|off; "on" for a model without a chat template is an error, not a silent fallback."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise QuantcheckError("--chat on was asked for but this model's tokenizer has no chat template: use --chat auto or off")
    use_chat = has_template and chat != "off"
    return GenerationSettings(
        prompt_style="chat-template" if use_chat else "plain",
        temperature=0.0 if greedy else temperature,
        greedy=greedy or temperature == 0,
        max_new_tokens=max_new_tokens,
        seed=seed,
        instruction=GENERATION_INSTRUCTION,
    )


def encode_generation_prompts(tokenizer, items: tuple[Item, ...], settings: GenerationSettings) -> list[list[int]]:
    prompts = []
    for item in items:
        text = generation_prompt(item)
        if settings.prompt_style == "chat-template":
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer.encode(rendered, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text + "\nAnswer:"))
    return prompts


def _generation_config(settings: GenerationSettings, tokenizer):
    from transformers import GenerationConfig

    # Every sampling knob is set explicitly, so nothing falls back to the model's own generation_config.
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not settings.greedy,
        temperature=settings.temperature if not settings.greedy else 1.0,
        top_p=1.0,
        top_k=0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    model_name: str,
    items: tuple[Item, ...],
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    *,
    batch_size: int,
    device: str,
    done: set[str],
    on_batch: Callable[[list[ItemRecord]], None],
) -> None:
    """Generate, parse and hand over each finished batch; the batch wall time is shared by its items."""
    config = _generation_config(settings, tokenizer)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for batch_index, rows in enumerate(plan_batches([len(ids) for ids in prompt_ids], batch_size)):
        if all(items[row].item_id in done for row in rows):
            continue
        batch = left_padded([prompt_ids[row] for row in rows], tokenizer.pad_token_id, device)
        batch.pop("position_ids")  # generate() derives them from the attention mask
        torch.manual_seed(settings.seed + batch_index)
        _synchronize(device)
        start = time.perf_counter()
        output = model.generate(**batch, generation_config=config)
        _synchronize(device)
        seconds = (time.perf_counter() - start) / len(rows)
        records = []
        for position, row in enumerate(rows):
            item = items[row]
            new_ids = output[position, batch["input_ids"].shape[1] :].tolist()
            length = next((index for index, token in enumerate(new_ids) if token in stop_ids), len(new_ids))
            text = tokenizer.decode(new_ids[:length], skip_special_tokens=True)
            pred = extract_choice(text, item.choices, LETTERS)
            records.append(
                ItemRecord(
                    item_id=item.item_id,
                    model=model_name,
                    answer=item.answer_letter,
                    generative=GeneratedAnswer(text=text, pred=pred, correct=pred == item.answer_letter, new_tokens=length, seconds=seconds),
                )
            )
        on_batch(records)
