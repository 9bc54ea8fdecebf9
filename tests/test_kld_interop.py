"""A llama.cpp `--kl-divergence-base` file as the reference (`--reference-kld`): read, checked, replayed.

The file in tests/data was written by llama.cpp's own llama-perplexity (tests/data/README.md says how)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import quantcheck, read_results

BASE = Path(__file__).parent / "data" / "smollm2-f32-c16.kld.gz"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed: `make llama-cpp` builds it",
)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kld") / "base.kld"
    path.write_bytes(gzip.decompress(BASE.read_bytes()))
    return path


def decoded_nll(path: Path) -> np.ndarray:
    """The base model's NLL of each scored token, read straight from the file as llama.cpp defines it:
    -(scale * q + min_log_prob) for every q, q = 0 included, over a row renormalized on the tokens llama.cpp's KL
    takes (log p above -16) and the scored token."""
    raw = path.read_bytes()
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, "<u4", 1, 8)[0], *np.frombuffer(raw, "<i4", 2, 12)
    tokens = np.frombuffer(raw, "<i4", n_ctx * n_chunk, 20).reshape(n_chunk, n_ctx)
    width, first = 2 * ((n_vocab + 1) // 2) + 4, n_ctx // 2
    rows = np.frombuffer(raw, "<u2", offset=20 + 4 * tokens.size).reshape(-1, width)
    nll = []
    for index, row in enumerate(rows):
        chunk, position = divmod(index, n_ctx - 1 - first)
        scale, minimum = row[:4].view("<f4")[:2]
        logprobs = scale * row[4 : 4 + n_vocab].astype(np.float32) + minimum
        target = tokens[chunk, first + position + 1]
        kept = logprobs > -16
        kept[target] = True
        nll.append(-(logprobs[target] - np.log(np.exp(logprobs[kept].astype(np.float64)).sum())))
    return np.array(nll)


def with_a_clamped_scored_token(path: Path, out: Path) -> tuple[Path, int, float]:
    """The file with one scored token's level set to q = 0, as llama.cpp writes a token more than 16 nats below the
    top: the scored token the base model found least likely (so the row stays a distribution to within its old
    probability). Returns the file, that position (over all scored tokens) and its log p as llama.cpp reads it,
    min_log_prob."""
    raw = bytearray(path.read_bytes())
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, "<u4", 1, 8)[0], *np.frombuffer(raw, "<i4", 2, 12)
    tokens = np.frombuffer(raw, "<i4", n_ctx * n_chunk, 20).reshape(n_chunk, n_ctx)
    width, first, rows_at = 2 * ((n_vocab + 1) // 2) + 4, n_ctx // 2, 20 + 4 * tokens.size
    targets = tokens[:, first + 1 :].ravel()
    rows = np.frombuffer(bytes(raw), "<u2", offset=rows_at).reshape(-1, width)
    index = int(np.argmin(rows[np.arange(len(rows)), 4 + targets]))
    at = rows_at + 2 * (index * width + 4 + int(targets[index]))
    raw[at : at + 2] = b"\0\0"
    out.write_bytes(bytes(raw))
    return out, index, float(rows[index, :4].view("<f4")[1])


@pytest.fixture(scope="module")
def run(base_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kld-run") / "run"
    quants = ["none", *(["gguf:F32", "gguf:Q8_0"] if importlib.util.find_spec("llama_cpp") else [])]
    result = quantcheck(
        "run",
        "--reference-kld",
        str(base_file),
        *(part for name in quants for part in ("--quant", name)),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def model(results: dict, name: str) -> dict:
    return next(entry for entry in results["models"] if entry["name"] == name)


def test_the_file_is_the_reference_and_its_windows_are_replayed(run, base_file):
    results = read_results(run)
    assert (
        results["dataset"]["kind"] == "text"
        and results["dataset"]["n_items"] == 2
        and results["dataset"]["context"] == 16
    )
    reference = model(results, "reference")
    assert reference["engine"]["engine"] == "llama-perplexity base file" and reference["cost"] is None
    records = [json.loads(line) for line in (run / "models" / "reference" / "corpus.jsonl").read_text().splitlines()]
    nll = np.array([value for record in sorted(records, key=lambda r: r["window"]) for value in record["nll"]])
    assert np.allclose(nll, decoded_nll(base_file), atol=1e-5)
    assert reference["corpus"]["perplexity"]["value"] == pytest.approx(np.exp(decoded_nll(base_file).mean()), rel=1e-5)
    assert any(warning["code"] == "no-cost" for warning in results["warnings"])


def test_transformers_fp32_against_llama_cpp_f32_is_the_engine_floor(run):
    """The recorded reference is the built-in model's F32 GGUF in llama.cpp; the same weights in transformers
    differ only by the engine (and the file's uint16 rounding)."""
    corpus = model(read_results(run), "none")["corpus"]
    assert corpus["kl"]["mean"]["value"] < 1e-3 and corpus["same_top1"]["value"] == 1.0
    assert abs(corpus["perplexity_ratio"]["value"] - 1) < 0.01


@needs_llama_cpp
def test_the_same_gguf_reproduces_the_file_and_q8_departs(run):
    results = read_results(run)
    f32, q8 = model(results, "gguf:F32")["corpus"], model(results, "gguf:Q8_0")["corpus"]
    assert f32["kl"]["mean"]["value"] < 1e-4 and abs(f32["perplexity_ratio"]["value"] - 1) < 1e-3
    assert q8["kl"]["mean"]["value"] > 10 * f32["kl"]["mean"]["value"]


def test_a_scored_token_at_level_zero_is_finite_as_in_llama_cpp_and_results_read_back(base_file, tmp_path):
    """Issue #24, defect 5: q = 0 on a scored token (llama-perplexity reads it as -(scale*0 + min_log_prob), about 16)
    made the reference's perplexity infinite, written as null, and results.json failed to read back."""
    from quantcheck.report.data import load_results

    clamped, index, min_log_prob = with_a_clamped_scored_token(base_file, tmp_path / "clamped.kld")
    expected = decoded_nll(clamped)
    assert (
        np.isfinite(expected).all() and min_log_prob < -16 and expected[index] == pytest.approx(-min_log_prob, abs=1e-3)
    )
    out = tmp_path / "run"
    result = quantcheck("run", "--reference-kld", str(clamped), "--quant", "none", "--skip-cost", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "models" / "reference" / "corpus.jsonl").read_text().splitlines()]
    nll = np.array([value for record in sorted(records, key=lambda r: r["window"]) for value in record["nll"]])
    assert np.allclose(nll, expected, atol=1e-5)
    reference = next(
        model for model in load_results(out).models if model.name == "reference"
    )  # validated by the schema: no null where a number belongs
    perplexity = reference.corpus.perplexity.value
    assert math.isfinite(perplexity) and perplexity == pytest.approx(np.exp(expected.mean()), rel=1e-5)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "cut short or not one file"),
        (lambda raw: b"_notlog_" + raw[8:], "it does not start with _logits_"),
    ],
)
def test_a_damaged_base_file_is_one_line_before_any_work(base_file, tmp_path, damage, message):
    broken = tmp_path / "broken.kld"
    broken.write_bytes(damage(base_file.read_bytes()))
    result = quantcheck("run", "--reference-kld", str(broken), "--quant", "none", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_base_file_brings_its_own_text(base_file, tmp_path):
    result = quantcheck(
        "run",
        "--reference-kld",
        str(base_file),
        "--dataset",
        "text:builtin",
        "--quant",
        "none",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2 and "leave --dataset out" in result.stderr
