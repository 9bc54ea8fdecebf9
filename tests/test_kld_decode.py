"""A llama-perplexity base file's rows decoded exactly as llama.cpp's own reader decodes them (issue #24, defect 5).

The file here is written by a transcription of llama.cpp's writer (tools/perplexity/perplexity.cpp, `log_softmax`
with a `uint16_t * log_prob`), and read back against a transcription of its reader (the `log_softmax` of the
kl-divergence mode): log p = scale * q + min_log_prob for every q, q = 0 included, and the KL's absolute
`p_log_base > -16` test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantcheck.backends.kldfile import read_kld_base

N_CTX, N_VOCAB = 8, 11  # an odd vocabulary: each row is padded to an even width
FIRST = N_CTX // 2


def llama_cpp_row(logits: np.ndarray) -> np.ndarray:
    """One uint16 row as llama.cpp writes it for --kl-divergence-base."""
    logits = logits.astype(np.float32)
    max_logit, min_logit = logits.max(), max(logits.min(), logits.max() - np.float32(16))
    log_sum_exp = np.float32(np.log(np.exp(logits - max_logit).astype(np.float64).sum()))
    min_log_prob = np.float32(min_logit - max_logit - log_sum_exp)
    scale = np.float32((max_logit - min_logit) / np.float32(65535))
    levels = np.where(logits > min_logit, np.rint((np.float32(1) / scale) * (logits - min_logit)), 0).astype("<u2")
    row = np.zeros(2 * ((N_VOCAB + 1) // 2) + 4, dtype="<u2")
    row[:4] = np.array([scale, min_log_prob], dtype="<f4").view("<u2")
    row[4 : 4 + N_VOCAB] = levels
    return row


def write_base(path: Path, tokens: np.ndarray, rows: list[np.ndarray]) -> Path:
    header = b"_logits_" + np.array([N_CTX], "<u4").tobytes() + np.array([N_VOCAB, len(tokens)], "<i4").tobytes()
    path.write_bytes(header + tokens.astype("<i4").tobytes() + np.stack(rows).tobytes())
    return path


def llama_cpp_decoded(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's reader: every token's log p (float32) and whether its KL sum takes it (p_log_base > -16.f)."""
    scale, min_log_prob = row[:4].view("<f4")[:2]
    log_p = scale * row[4 : 4 + N_VOCAB].astype(np.float32) + min_log_prob
    return log_p, log_p > np.float32(-16)


def constructed(tmp_path: Path) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    """Two chunks of three scored positions each, with the rows that defect 5 is about:
    - a peaked row whose scored token sits more than 16 nats below the top (clamped to q = 0): llama-perplexity's
      NLL there is -min_log_prob, about 16, where reading q = 0 as -inf made it infinite;
    - a flat-topped row (log-sum-exp of the top about 2.4 nats) with a token 14.5 nats below the top: q > 0 but its
      log p is below -16, so llama.cpp's absolute test leaves it out of its KL ("16 nats below the top" kept it);
    - rows whose logits span less than 16 nats: q = 0 is the lowest token (the scored one, then another) at a
      finite log p above -16, in llama.cpp's KL, where reading q = 0 as -inf dropped it."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, N_VOCAB, size=(2, N_CTX))
    logits = []
    for chunk in range(2):
        for position in range(N_CTX - 1 - FIRST):
            target = tokens[chunk, FIRST + position + 1]
            row = rng.normal(0, 1, N_VOCAB)
            if (chunk, position) == (0, 0):
                row[:] = -30.0
                row[(target + 1) % N_VOCAB] = 0.0
                row[(target + 2) % N_VOCAB] = -3.0
            elif (chunk, position) == (0, 1):
                row[:] = 0.0
                row[(target + 3) % N_VOCAB] = -14.5
                row[(target + 5) % N_VOCAB] = -15.9  # the lowest (q = 0), so that the one at -14.5 has q > 0
            elif (chunk, position) in ((1, 0), (1, 1)):
                lowest = target if position == 0 else (target + 4) % N_VOCAB  # the scored token, then another
                row = np.linspace(0.0, -9.0, N_VOCAB)
                row[lowest] = -10.0
            logits.append(row)
    rows = [llama_cpp_row(row) for row in logits]
    return write_base(tmp_path / "base.kld", tokens, rows), tokens, rows


def test_q0_decodes_finite_as_llama_cpp_and_kl_drops_by_the_absolute_test(tmp_path):
    path, tokens, rows = constructed(tmp_path)
    base = read_kld_base(path)
    scored = N_CTX - 1 - FIRST
    for chunk in range(2):
        decoded = base.logprobs(chunk)
        assert np.isfinite(decoded[np.arange(scored), tokens[chunk, FIRST + 1 :]]).all()
        for position in range(scored):
            row, target = rows[chunk * scored + position], tokens[chunk, FIRST + position + 1]
            log_p, in_kl = llama_cpp_decoded(row)
            kept = in_kl.copy()
            kept[target] = True
            log_z = np.log(np.exp(log_p[kept].astype(np.float64)).sum())
            # the scored token's NLL is llama.cpp's -(scale * q + min_log_prob), up to the renormalization
            assert np.isclose(-decoded[position, target], -(log_p[target] - log_z), rtol=1e-6, atol=0)
            assert np.isfinite(decoded[position, target]) and np.allclose(
                decoded[position][kept], log_p[kept] - log_z, atol=1e-6
            )
            assert np.isneginf(decoded[position][~kept]).all()
    # the rows that carry defect 5, checked for what they were built to show
    q = lambda chunk, position, token: rows[chunk * scored + position][4 + token]  # noqa: E731
    target = tokens[0, FIRST + 1]
    assert q(0, 0, target) == 0 and -base.logprobs(0)[0, target] > 16 and np.isfinite(base.logprobs(0)[0, target])
    low = (tokens[0, FIRST + 2] + 3) % N_VOCAB
    assert q(0, 1, low) > 0 and llama_cpp_decoded(rows[1])[0][low] <= -16 and np.isneginf(base.logprobs(0)[1, low])
    for position, lowest in enumerate((tokens[1, FIRST + 1], (tokens[1, FIRST + 2] + 4) % N_VOCAB)):
        log_p = llama_cpp_decoded(rows[scored + position])[0]
        assert (
            q(1, position, lowest) == 0
            and -16 < log_p[lowest] < -10
            and np.isfinite(base.logprobs(1)[position, lowest])
        )
