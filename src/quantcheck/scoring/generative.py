"""Free-generation multiple choice: the original experiment's benchmark, done soundly.

Every model gets the same explicit decoding settings (never its own generation_config defaults,
but all of its stop tokens), fixed seeds (so a resumed run reproduces the same samples), and its answer is parsed
from the text; an unparsable answer is kept as its own category instead of silently counting as
a wrong letter.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from quantcheck.data.batching import plan_batches
from quantcheck.data.items import LETTERS, Item
from quantcheck.data.prompts import GENERATION_INSTRUCTION, generation_prompt
from quantcheck.errors import QuantcheckError
from quantcheck.metrics.answers import extract_choice
from quantcheck.schema.results import GeneratedAnswer, GenerationSettings, ItemRecord


def sample_seed(run_seed: int, model_name: str, item_id: str) -> int:
    """The seed of one model's sample of one item: independent across models and items, the same on every resume.

    Each model draws with its own seeds, the reference's resample included, so "the variant against the
    reference" and "the reference against its resample" are the same kind of comparison: had the variants
    reused the reference's seeds, their samples would agree with the reference's more often than an
    independent draw does, and the sampling floor would flatter them. 31 bits: some servers parse int32.
    """
    digest = hashlib.blake2b(f"{run_seed}\0{model_name}\0{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def stop_token_ids(tokenizer, model_folder: str) -> list[int]:
    """Every token the model stops on: its generation_config's eos list plus the tokenizer's eos.

    Chat models (Llama-3, Gemma, Phi-3) end a turn on a token other than the tokenizer's eos;
    replacing their list with the single eos lets them run on past their answer.
    """
    stops: list[int] = []
    config = Path(model_folder) / "generation_config.json"
    if config.exists():
        declared = json.loads(config.read_text()).get("eos_token_id")
        stops += declared if isinstance(declared, list) else [declared] if declared is not None else []
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    return sorted(set(stops))


def resolve_settings(
    tokenizer, chat: str, temperature: float, greedy: bool, max_new_tokens: int, seed: int, stops: list[int]
) -> GenerationSettings:
    """`chat` is auto|on|off; "on" for a model without a chat template is an error, not a silent fallback."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise QuantcheckError(
            "--chat on was asked for but this model's tokenizer has no chat template: use --chat auto or off"
        )
    use_chat = has_template and chat != "off"
    return GenerationSettings(
        prompt_style="chat-template" if use_chat else "plain",
        temperature=0.0 if greedy else temperature,
        greedy=greedy or temperature == 0,
        max_new_tokens=max_new_tokens,
        seed=seed,
        instruction=GENERATION_INSTRUCTION,
        stop_token_ids=stops,
    )


def encode_generation_prompts(tokenizer, items: tuple[Item, ...], settings: GenerationSettings) -> list[list[int]]:
    prompts = []
    for item in items:
        text = generation_prompt(item)
        if settings.prompt_style == "chat-template":
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            prompts.append(tokenizer.encode(rendered, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text + "\nAnswer:"))
    return prompts


def encode_chats(tokenizer, chats: list[tuple[dict[str, str], ...]], settings: GenerationSettings) -> list[list[int]]:
    """Users' chats as the model is prompted with them: its chat template with the assistant's turn opened,
    or (no template, or --chat off) the turns' texts one after the other."""
    if settings.prompt_style == "chat-template":
        rendered = [
            tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False) for chat in chats
        ]
        return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
    return [tokenizer.encode("\n\n".join(message["content"] for message in chat) + "\n\n") for chat in chats]


def generate_answers(
    generate: Callable[[list[list[int]], GenerationSettings, list[int]], list[list[int]]],
    tokenizer,
    model_name: str,
    items: tuple[Item, ...],
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    *,
    batch_size: int,
    done: set[str],
    on_batch: Callable[[list[ItemRecord]], None],
) -> None:
    """Generate through the backend's request, decode and parse, and hand over each finished batch.

    Seeds are per model and item (`sample_seed`), so engines that seed per request reproduce an item's
    sample whatever batch it lands in; per-batch engines use the batch's first seed. The batch's
    wall time is shared by its items.
    """
    for rows in plan_batches([len(ids) for ids in prompt_ids], batch_size):
        if all(items[row].item_id in done for row in rows):
            continue
        start = time.perf_counter()
        outputs = generate(
            [prompt_ids[row] for row in rows],
            settings,
            [sample_seed(settings.seed, model_name, items[row].item_id) for row in rows],
        )
        seconds = (time.perf_counter() - start) / len(rows)
        records = []
        for row, new_ids in zip(rows, outputs):
            item = items[row]
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            pred = extract_choice(text, item.choices, LETTERS)
            records.append(
                ItemRecord(
                    item_id=item.item_id,
                    model=model_name,
                    answer=item.answer_letter,
                    generative=GeneratedAnswer(
                        text=text,
                        pred=pred,
                        correct=pred == item.answer_letter,
                        new_tokens=len(new_ids),
                        seconds=seconds,
                    ),
                )
            )
        on_batch(records)
