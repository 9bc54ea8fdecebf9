"""A text's windows cut exactly as llama-perplexity cuts them (issue #24, defect 9), for a tokenizer that adds a
beginning-of-sequence token and for one that does not (the built-in GGUF has add_bos_token=false)."""

from __future__ import annotations

import pytest

from quantcheck.data.corpus import first_scored, load_corpus, make_windows, scored_per_window


def llama_perplexity_windows(
    tokenizer, text: str, n_ctx: int, n_chunks: int, add_bos: bool
) -> list[tuple[list[int], list[int]]]:
    """tools/perplexity/perplexity.cpp, `perplexity()` with --kl-divergence-base (and `kl_divergence()` reading it
    back): `tokens = common_tokenize(ctx, params.prompt, true)` (BOS first where the vocabulary adds one), n_chunk =
    min(--chunks, tokens.size() / n_ctx), chunk i is tokens[i*n_ctx, (i+1)*n_ctx) with its first position set to
    BOS when add_bos, and the logits at first = n_ctx/2 .. n_ctx-2 score tokens first+1 .. n_ctx-1.
    Returns each window's ids and the ids it scores."""
    tokens = tokenizer.encode(text, add_special_tokens=True)
    n_chunk = min(n_chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    windows = []
    for i in range(n_chunk):
        window = tokens[i * n_ctx : (i + 1) * n_ctx]
        if add_bos:
            window[0] = tokenizer.bos_token_id
        windows.append((window, window[first + 1 : n_ctx]))
    return windows


@pytest.fixture(scope="module")
def text() -> str:
    return load_corpus("text:builtin").text[:6000]


def builtin_tokenizer(add_bos: bool):
    from tokenizers.processors import TemplateProcessing

    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(builtin_model_dir()))
    if add_bos:  # the same vocabulary, configured as a tokenizer that adds BOS (llama.cpp's add_bos_token=true)
        assert tokenizer.bos_token_id is not None
        bos = tokenizer.bos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
        )
        assert tokenizer.encode("a")[0] == tokenizer.bos_token_id
    else:
        assert tokenizer.encode("a")[0] != tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("add_bos", [True, False], ids=["adds-bos", "no-bos"])
@pytest.mark.parametrize("context", [16, 64])
def test_windows_and_scored_tokens_are_llama_perplexitys(text, add_bos, context):
    tokenizer = builtin_tokenizer(add_bos)
    expected = llama_perplexity_windows(tokenizer, text, context, 5, add_bos)
    windows = make_windows(tokenizer, text, context, 5)
    assert len(windows) == len(expected) == 5
    assert windows == [window for window, _ in expected]
    first = first_scored(context)
    assert first == context // 2 and scored_per_window(context) == context - 1 - first
    assert [window[first + 1 :] for window in windows] == [scored for _, scored in expected]
    if add_bos:  # the text's first token is the first window's second, not dropped
        assert windows[0][:2] == [tokenizer.bos_token_id, tokenizer.encode(text, add_special_tokens=False)[0]]
