"""`scoring/generative` directly, on the built-in model's real tokenizer: the stop tokens every engine is given, the
settings one run shares, and the prompts' token ids (a defect here would show only as a wrong accuracy far away)."""

from __future__ import annotations

import json

import pytest

from quantcheck.data.load import load_dataset
from quantcheck.data.prompts import GENERATION_INSTRUCTION, generation_prompt
from quantcheck.errors import QuantcheckError
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.models.loading import load_tokenizer
from quantcheck.scoring.generative import encode_generation_prompts, resolve_settings, stop_token_ids


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(builtin_model_dir()))


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ({"eos_token_id": [2, 50, 7]}, [2, 7, 50]),  # a chat model's turn-end tokens are kept beside the eos
        ({"eos_token_id": 50}, [2, 50]),
        ({"bos_token_id": 1}, [2]),
        (None, [2]),  # no generation_config.json: the tokenizer's eos alone
    ],
)
def test_stop_tokens_are_the_models_declared_list_and_the_tokenizers_eos(tokenizer, tmp_path, declared, expected):
    if declared is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(declared))
    assert tokenizer.eos_token_id == 2
    assert stop_token_ids(tokenizer, str(tmp_path)) == expected


def test_settings_temperature_zero_is_greedy_and_chat_on_without_a_template_is_refused(tokenizer):
    settings = resolve_settings(tokenizer, "auto", 0.0, False, 16, 3, [2])
    assert settings.greedy and settings.temperature == 0.0 and settings.prompt_style == "chat-template"
    assert resolve_settings(tokenizer, "off", 0.1, False, 16, 3, [2]).prompt_style == "plain"
    forced = resolve_settings(tokenizer, "auto", 0.7, True, 16, 3, [2])
    assert forced.greedy and forced.temperature == 0.0
    templateless = load_tokenizer(str(builtin_model_dir()))
    templateless.chat_template = None
    with pytest.raises(QuantcheckError, match="--chat on was asked for but this model's tokenizer has no chat"):
        resolve_settings(templateless, "on", 0.1, False, 16, 3, [2])


def test_chat_prompts_are_the_templates_ids_once_and_plain_prompts_end_in_answer():
    """With a tokenizer that adds a BOS when it encodes (Llama's do), the rendered template, which already holds its
    special tokens, must not get another one."""
    tokenizer = load_tokenizer(str(builtin_model_dir()))
    tokenizer.add_bos_token = True
    items = load_dataset("mmlu:virology").items[:3]
    chat = resolve_settings(tokenizer, "auto", 0.1, False, 16, 0, [2])
    encoded = encode_generation_prompts(tokenizer, items, chat)
    for item, ids in zip(items, encoded, strict=True):
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": generation_prompt(item)}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert ids == list(expected)  # the template's own special tokens, none added by encoding it again
        assert GENERATION_INSTRUCTION in tokenizer.decode(ids)
        assert tokenizer.decode(ids).rstrip().endswith("assistant")  # the assistant's turn is open
    plain = encode_generation_prompts(tokenizer, items, resolve_settings(tokenizer, "off", 0.1, False, 16, 0, [2]))
    assert all(tokenizer.decode(ids).endswith("\nAnswer:") for ids in plain)
