"""Text corpora (--dataset text:FILE) on the built-in model: real runs, llama-perplexity's statistics,
the compact store against the full one, and what is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import quantcheck, read_results
from test_cli_errors import assert_one_line_error

WINDOWS, CONTEXT = 6, 256
VARIANTS = ["none", "bf16", "torchao-int8wo"]


def corpus_run(out: Path, *extra: str) -> Path:
    result = quantcheck(
        "run",
        "--dataset",
        "text:builtin",
        "--limit",
        str(WINDOWS),
        "--context",
        str(CONTEXT),
        "--skip-cost",
        "--out",
        str(out),
        *(arg for name in VARIANTS for arg in ("--quant", name)),
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {store: corpus_run(root / store, "--store", store) for store in ("compact", "full")}


def windows(run: Path, model: str) -> list[dict]:
    lines = (run / "models" / model / "corpus.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda record: record["window"])


def by_name(results: dict) -> dict[str, dict]:
    return {model["name"]: model for model in results["models"]}


@pytest.mark.parametrize("store", ["compact", "full"])
def test_identity_variant_gives_kl_zero_and_ppl_ratio_one_exactly(runs, store):
    results = read_results(runs[store])
    assert results["dataset"]["kind"] == "text" and results["dataset"]["n_items"] == WINDOWS
    identity = by_name(results)["none"]["corpus"]
    assert identity["tokens"] == WINDOWS * (CONTEXT - 1 - CONTEXT // 2)
    assert identity["perplexity_ratio"]["value"] == 1.0 and identity["mean_log_ratio"]["value"] == 0.0
    assert all(estimate["value"] == 0.0 for estimate in identity["kl"].values())
    assert all(estimate["value"] == 0.0 for estimate in identity["delta_p"].values())
    assert identity["same_top1"]["value"] == 1.0
    assert identity["perplexity"]["value"] == by_name(results)["reference"]["corpus"]["perplexity"]["value"]


def test_reference_perplexity_equals_an_independent_forward(runs):
    """PPL from the stored windows, recomputed here with transformers: the windows and NLLs are what llama-perplexity
    defines."""
    from transformers import AutoModelForCausalLM

    from quantcheck.models.builtin import builtin_model_dir

    run = runs["full"]
    tokens = json.loads((run / "reference" / "tokens.json").read_text())
    assert len(tokens) == WINDOWS and all(len(window) == CONTEXT for window in tokens)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor(tokens)).logits.double(), dim=-1)
    first = CONTEXT // 2
    targets = torch.tensor(tokens)[:, first + 1 :]
    nll = -logprobs[:, first:-1].gather(-1, targets[..., None])[..., 0]
    stored = np.array([record["nll"] for record in windows(run, "reference")])
    assert np.allclose(stored, nll.numpy(), atol=2e-4)
    reported = by_name(read_results(run))["reference"]["corpus"]["perplexity"]["value"]
    assert reported == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)


def test_variant_statistics_are_those_of_its_tokens(runs):
    """Each reported number recomputed from the per-token records: mean KL, percentiles, top-1, delta-p, PPL ratio."""
    run = runs["full"]
    reference = np.array([record["nll"] for record in windows(run, "reference")])
    corpus = by_name(read_results(run))["bf16"]["corpus"]
    records = windows(run, "bf16")
    nll, kl = np.array([r["nll"] for r in records]), np.array([r["kl"] for r in records])
    assert corpus["kl"]["mean"]["value"] == pytest.approx(kl.mean(), rel=1e-9)
    assert corpus["kl"]["99"]["value"] == pytest.approx(np.percentile(kl, 99), rel=1e-9)
    assert corpus["kl"]["max"]["value"] == pytest.approx(kl.max(), rel=1e-9) and kl.min() >= 0
    assert corpus["same_top1"]["value"] == pytest.approx(np.mean([r["top1_agree"] for r in records]))
    delta_p = np.exp(-nll) - np.exp(-reference)
    assert corpus["delta_p"]["rms"]["value"] == pytest.approx(np.sqrt((delta_p**2).mean()), rel=1e-9)
    assert corpus["perplexity_ratio"]["value"] == pytest.approx(math.exp((nll - reference).mean()), rel=1e-9)
    assert 0 < corpus["kl"]["mean"]["value"] < 0.05 and corpus["same_top1"]["value"] > 0.8  # bf16 of a 135M model
    interval = corpus["kl"]["mean"]["ci"]
    assert interval["low"] <= corpus["kl"]["mean"]["value"] <= interval["high"]


def test_kl_along_the_context_is_that_of_each_share_of_the_scored_tokens(runs):
    """results.json's eight shares recomputed from the per-token records: tokens, mean KL, top-1 and delta-p; the
    growth is the last share's mean KL minus the first's, window by window."""
    run = runs["full"]
    results = by_name(read_results(run))
    reference = np.array([record["nll"] for record in windows(run, "reference")])
    records = windows(run, "bf16")
    kl, nll = np.array([r["kl"] for r in records]), np.array([r["nll"] for r in records])
    top1 = np.array([r["top1_agree"] for r in records], dtype=float)
    delta_p = np.exp(-nll) - np.exp(-reference)
    buckets = results["bf16"]["corpus"]["by_position"]
    scored = kl.shape[1]
    edges = [round(i * scored / 8) for i in range(9)]
    assert [(b["start"], b["end"]) for b in buckets] == list(zip(edges[:-1], edges[1:]))
    for bucket, start, end in zip(buckets, edges[:-1], edges[1:]):
        assert bucket["tokens"] == WINDOWS * (end - start)
        assert bucket["kl"]["value"] == pytest.approx(kl[:, start:end].mean(), rel=1e-9)
        assert bucket["top1"]["value"] == pytest.approx(top1[:, start:end].mean(), rel=1e-9)
        assert bucket["delta_p"]["value"] == pytest.approx(delta_p[:, start:end].mean(), rel=1e-9, abs=1e-12)
    growth = kl[:, edges[-2] :].mean(axis=1) - kl[:, : edges[1]].mean(axis=1)
    assert results["bf16"]["corpus"]["kl_growth"]["value"] == pytest.approx(growth.mean(), rel=1e-9)
    assert all(b["kl"]["value"] == 0.0 for b in results["none"]["corpus"]["by_position"])


def test_damage_that_grows_along_the_context_is_named_and_flat_damage_is_not():
    """Constructed windows: the same mean KL, spread evenly in one variant and rising along each window in the other."""
    from quantcheck.analysis.summarize import variant_corpus_statistics
    from quantcheck.analysis.verdict import decide
    from quantcheck.schema.results import ModelResult, Thresholds, WindowRecord

    rng = np.random.default_rng(3)
    scored = 64
    reference = [WindowRecord(window=w, model="reference", nll=[2.0] * scored) for w in range(12)]

    def variant(name: str, profile: np.ndarray) -> ModelResult:
        records = [
            WindowRecord(
                window=w,
                model=name,
                nll=[2.01] * scored,
                kl=(profile * rng.lognormal(0, 0.3, scored)).tolist(),
                top1_agree=[True] * scored,
                jaccard={1: 1.0},
            )
            for w in range(12)
        ]
        corpus, agreement = variant_corpus_statistics(reference, records, 128, 0, None)
        result = ModelResult(name=name, description=name, status="ok", corpus=corpus, agreement=agreement)
        result.verdict = decide(result, Thresholds(), unit="windows")
        return result

    rising = variant("kv-fp8", np.linspace(0.001, 0.04, scored))
    flat = variant("int8", np.full(scored, 0.02))
    growth = rising.corpus.kl_growth
    assert growth.ci.low > 0 and len(rising.corpus.by_position) == 8
    assert [b.kl.value for b in rising.corpus.by_position] == sorted(b.kl.value for b in rising.corpus.by_position)
    assert any("mean KL grows along the context" in reason for reason in rising.verdict.reasons)
    assert flat.corpus.kl_growth.ci.low <= 0
    assert not any("grows along the context" in reason for reason in flat.verdict.reasons)


def test_compact_store_kl_within_one_percent_of_the_full_store(runs):
    """The compact store's estimate against the exact KL, on the same tokens; the bounds hold at every token."""
    for variant in ("bf16", "torchao-int8wo"):
        exact = np.array([r["kl"] for r in windows(runs["full"], variant)])
        compact = windows(runs["compact"], variant)
        estimate = np.array([r["kl"] for r in compact])
        lower, upper = (
            np.array([r["kl_lower"] for r in compact]),
            np.array([r["kl_upper"] for r in compact], dtype=float),
        )
        assert abs(estimate.mean() / exact.mean() - 1) < 0.01, (variant, estimate.mean(), exact.mean())
        assert (lower <= exact + 1e-9).all() and (exact <= upper + 1e-9).all(), (
            variant,
            (lower - exact).max(),
            (exact - upper).max(),
        )
        compact_result = by_name(read_results(runs["compact"]))[variant]
        assert compact_result["agreement"]["kl"]["store"] == "compact"
        assert (
            compact_result["corpus"]["same_top1"]["value"]
            == by_name(read_results(runs["full"]))[variant]["corpus"]["same_top1"]["value"]
        )


def test_verdict_judges_kl_and_top1_on_the_text(runs):
    results = read_results(runs["compact"])
    verdict = by_name(results)["bf16"]["verdict"]
    assert set(verdict["checks"]) == {"memory", "mean KL", "top-1 agreement"}
    assert not any("accuracy" in reason for reason in verdict["reasons"])
    assert any(warning["code"] == "small-sample" and "windows" in warning["message"] for warning in results["warnings"])


def test_a_finished_corpus_run_is_kept_and_a_truncated_store_refused(runs, tmp_path):
    import shutil

    run = shutil.copytree(runs["compact"], tmp_path / "run")
    before = (run / "models" / "bf16" / "corpus.jsonl").read_text()
    again = quantcheck(
        "run",
        "--dataset",
        "text:builtin",
        "--limit",
        str(WINDOWS),
        "--context",
        str(CONTEXT),
        "--skip-cost",
        "--out",
        str(run),
        *(arg for name in VARIANTS for arg in ("--quant", name)),
    )
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already finished") == 1 + len(VARIANTS)
    store = run / "reference" / "compact.npy"
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])
    refused = quantcheck(
        "run",
        "--dataset",
        "text:builtin",
        "--limit",
        str(WINDOWS),
        "--context",
        str(CONTEXT),
        "--skip-cost",
        "--out",
        str(run),
        "--quant",
        "none",
    )
    assert refused.returncode == 2
    message = refused.stderr.strip() + refused.stdout.strip()
    assert "compact.npy is not this run's compact reference store" in message and "Traceback" not in message
    assert (run / "models" / "bf16" / "corpus.jsonl").read_text() == before  # nothing computed is lost


def test_a_foreign_store_is_refused(runs, tmp_path):
    """A store of another length (another corpus's rows) in this run's folder: one line, no work."""
    import shutil

    run = shutil.copytree(runs["full"], tmp_path / "run")
    store = run / "reference" / "logprobs.npy"
    np.save(store, np.load(store)[:-1])
    refused = quantcheck(
        "run",
        "--dataset",
        "text:builtin",
        "--limit",
        str(WINDOWS),
        "--context",
        str(CONTEXT),
        "--skip-cost",
        "--out",
        str(run),
        "--quant",
        "none",
        "--store",
        "full",
    )
    assert refused.returncode == 2
    assert "logprobs.npy is not this run's full reference store" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"text": "fine"}\nnot json\n', ".jsonl", ":2: not valid JSON"),
        ('{"title": "no text"}\n', ".jsonl", ':1: expected an object with a "text" string'),
        ("   \n", ".txt", "the corpus has no text"),
    ],
)
def test_bad_corpus_files_are_one_line_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content)
    result = quantcheck("run", "--dataset", f"text:{path}", "--quant", "none", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--context", "9000", "--quant", "none"], "--context 9000 is above smollm2-135m's limit of 8192 tokens"),
        (
            ["--context", "4096", "--quant", "gguf:Q8_0"],
            "longer than llama.cpp's context holds (--n-ctx 2048): raise --n-ctx to 4096",
        ),
    ],
)
def test_a_context_past_the_model_or_the_engine_is_one_line_before_any_model_loads(tmp_path, arguments, message):
    out = tmp_path / "out"
    result = quantcheck("run", "--dataset", "text:builtin", *arguments, "--skip-cost", "--out", str(out))
    assert_one_line_error(result, message)
    assert not (out / "models").exists()


def test_a_text_shorter_than_one_window_says_so(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A few words only.")
    result = quantcheck(
        "run", "--dataset", f"text:{path}", "--quant", "none", "--skip-cost", "--out", str(tmp_path / "out")
    )
    assert result.returncode == 2 and "fewer than one window of --context 512" in result.stderr


def test_metrics_csv_holds_the_corpus_numbers(runs):
    import csv

    rows = {row["model"]: row for row in csv.DictReader((runs["full"] / "metrics.csv").open())}
    corpus = by_name(read_results(runs["full"]))["bf16"]["corpus"]
    assert float(rows["bf16"]["perplexity_ratio"]) == pytest.approx(corpus["perplexity_ratio"]["value"], rel=1e-12)
    assert int(rows["bf16"]["scored_tokens"]) == corpus["tokens"] and rows["reference"]["perplexity_ratio"] == ""
