"""The whole pipeline on the real built-in model: agreement, accuracy, generation, verdicts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SMALL_COST, assert_inconclusive_on_few_questions, quantcheck, read_items, read_results
from quantcheck.analysis.verdict import decide
from quantcheck.data.items import LETTERS
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.schema.results import ModelResult, Thresholds
from test_cli_errors import assert_one_line_error


def by_model(items: list[dict], name: str) -> list[dict]:
    return [item for item in items if item["model"] == name]


def test_none_variant_is_identical_to_the_reference(small_run):
    items = by_model(read_items(small_run), "none")
    assert len(items) == 8
    for item in items:
        assert item["kl"] <= 1e-6
        assert item["top1_agree"] is True
        assert all(value == 1.0 for value in item["jaccard"].values())
    none = next(m for m in read_results(small_run)["models"] if m["name"] == "none")
    assert none["agreement"]["top1_agreement"]["value"] == 1.0
    assert none["paired_loglik"]["right_to_wrong"] == none["paired_loglik"]["wrong_to_right"] == 0
    assert none["paired_loglik"]["mcnemar_p"] == 1.0
    assert none["paired_loglik"]["answer_agreement"] == 1.0


def test_the_identity_variant_fails_on_memory_alone_and_is_inconclusive_on_8_questions_without_it(small_run):
    raw = next(m for m in read_results(small_run)["models"] if m["name"] == "none")
    assert raw["verdict"]["decision"] == "DON'T QUANTIZE" and raw["verdict"]["checks"]["memory"] == "fail"
    assert raw["verdict"]["reasons"][0] == "saves no weight memory, less than the 20% saving required"
    assert {state for name, state in raw["verdict"]["checks"].items() if name != "memory"} == {"unclear"}
    # Without the memory requirement nothing fails: 8 questions are too few to judge any quality check.
    verdict = decide(ModelResult.model_validate(raw), Thresholds(min_memory_saving=0.0))
    assert_inconclusive_on_few_questions({"verdict": verdict.model_dump()}, 8)


def test_four_bit_variant_differs_from_the_reference(small_run):
    items = by_model(read_items(small_run), "bnb-nf4")
    assert len(items) == 8
    jaccards = [value for item in items for value in item["jaccard"].values()]
    assert all(0.0 <= value <= 1.0 for value in jaccards)
    assert min(jaccards) < 1.0
    assert all(item["kl"] >= 0 for item in items) and max(item["kl"] for item in items) > 0
    variant = next(m for m in read_results(small_run)["models"] if m["name"] == "bnb-nf4")
    assert variant["agreement"]["kl"]["mean"]["value"] > 0
    assert set(variant["agreement"]["jaccard"]) == {"1", "2", "3", "5", "10", "20"}
    assert_inconclusive_on_few_questions(variant, 8)  # memory passes (4-bit), every quality check needs 10


def test_reference_accuracy_equals_an_independent_loglikelihood_computation(small_run):
    """Score each question unbatched, appending each answer letter to the prompt, as lm-eval does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions = [json.loads(line) for line in (small_run / "dataset.jsonl").read_text().splitlines()]
    predictions = {}
    for question in questions:
        options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question["choices"]))
        context = (
            "The following are multiple choice questions (with answers) about virology.\n\n"
            f"{question['question']}\n{options}\nAnswer:"
        )
        context_ids = tokenizer(context, return_tensors="pt").input_ids
        scores = []
        for letter in LETTERS[: len(question["choices"])]:
            full = tokenizer(context + " " + letter, return_tensors="pt").input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(full).logits[0, -2].double(), -1)
            scores.append(logprobs[full[0, context_ids.shape[1]]].item())
        predictions[question["item_id"]] = LETTERS[max(range(len(scores)), key=scores.__getitem__)]
    reference_items = by_model(read_items(small_run), "reference")
    assert {item["item_id"]: item["loglik"]["pred"] for item in reference_items} == predictions
    expected_accuracy = sum(predictions[q["item_id"]] == q["answer"] for q in questions) / len(questions)
    reference = read_results(small_run)["models"][0]
    assert reference["loglik"]["accuracy"] == pytest.approx(expected_accuracy)


def test_generated_answers_are_saved_with_speed_and_paired_statistics(small_run):
    items = read_items(small_run)
    generated = [item["generative"] for item in items]
    assert all(answer is not None and isinstance(answer["text"], str) for answer in generated)
    assert any(answer["text"].strip() for answer in generated)
    results = read_results(small_run)
    for model in results["models"]:
        quality = model["generative"]
        assert quality["words_per_minute"] > 0 and quality["tokens_per_second"] > 0
        assert quality["settings"]["temperature"] == 0.1 and quality["settings"]["prompt_style"] == "chat-template"
        assert quality["accuracy"]["n"] == 8
    for model in results["models"][1:]:
        paired = model["paired_generative"]
        assert paired["n"] == 8 and 0 <= paired["mcnemar_p"] <= 1
        assert paired["difference_ci"]["low"] <= paired["difference"] <= paired["difference_ci"]["high"]


def test_results_record_environment_dataset_and_cost(small_run):
    results = read_results(small_run)
    assert results["finished"] is True and results["missing"] == []
    assert results["model"]["reference_dtype"] == "float32" and results["model"]["source"] == "builtin"
    assert results["environment"]["cpu_capability"] and results["environment"]["torch_threads"] >= 1
    assert results["dataset"]["n_items"] == 8 and "Answer:" in results["dataset"]["prompt_format"]
    for model in results["models"]:
        cost = model["cost"]
        assert cost["weights"]["counted_bytes"] > 0 and cost["load_time_s"] > 0
        assert [point["batch_size"] for point in cost["latency"]] == [1, 2]
        for point in cost["latency"]:
            assert point["status"] == "ok" and point["p10_s"] <= point["median_s"] <= point["p90_s"]
            assert point["cv"] is not None
        assert cost["generation"]["decode_tokens_per_s"] > 0
    nf4 = next(m for m in results["models"] if m["name"] == "bnb-nf4")
    assert nf4["cost_vs_reference"]["weight_memory_ratio"] < 0.75
    assert nf4["precision"]["parameter_dtypes"].get("uint8", 0) > 0


def test_out_of_memory_at_a_large_batch_is_recorded_and_the_run_finishes(small_run, tmp_path):
    """A memory cap between batch 1 and batch 32: batch 32's [32, 64, vocab] logits alone take 400 MB."""
    from conftest import quantcheck

    small_peaks = [point["peak_memory_bytes"] for point in read_results(small_run)["models"][0]["cost"]["latency"]]
    cap_gb = (max(small_peaks) + 150 * 2**20) / 2**30
    out = tmp_path / "run"
    result = quantcheck(
        "run",
        "--quant",
        "none",
        "--limit",
        "4",
        "--skip-quality",
        "--out",
        str(out),
        "--batch-sizes",
        "1,32,64",
        "--seq-len",
        "64",
        "--time-budget",
        "0.5",
        "--iterations",
        "2",
        "--max-memory-gb",
        f"{cap_gb:.3f}",
        "--cost-rounds",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_results(out)
    for model in results["models"]:
        statuses = [point["status"] for point in model["cost"]["latency"]]
        assert statuses == ["ok", "oom", "skipped"], (model["name"], statuses)
        assert "memory cap" in model["cost"]["latency"][1]["error"]
    assert results["missing"] == [] and (out / "report.html").exists()


def test_each_model_measures_its_engines_numeric_floor(small_run):
    """Defect 3 of #24: each model is scored twice by its own engine (at most 8 at a time, here the run's --batch-size
    3, then one at a time) on a bounded subset; the verdict reads the noisier of the reference's and the variant's.
    transformers fp32 moves almost nothing."""
    results = read_results(small_run)
    floors = {entry["name"]: entry["engine_floor"] for entry in results["models"]}
    assert all(floor is not None and floor["n"] == 8 and floor["batch_size"] == 3 for floor in floors.values())
    assert results["floors"]["numeric"] == floors["reference"]
    assert floors["reference"]["kl_mean"] < 1e-6 and floors["reference"]["top1_agreement"] == 1.0
    assert 0 <= floors["bnb-nf4"]["kl_mean"] <= floors["bnb-nf4"]["kl_max"]


def test_unparsable_answers_are_counted_warned_and_listed(small_run):
    """The 8-question run's generated answers include some no parser reads (deterministic on CPU): each model's count
    equals its items without a parsed answer, and a model with any gets a warning that the report shows."""
    results, items = read_results(small_run), read_items(small_run)
    warned = {
        warning["model"]: warning["message"]
        for warning in results["warnings"]
        if warning["code"] == "unparsable-answers"
    }
    counts = {model["name"]: model["generative"]["unparsable"] for model in results["models"]}
    assert sum(counts.values()) > 0, counts  # the condition happened
    report = (small_run / "report.md").read_text()
    for name, count in counts.items():
        unread = [item for item in by_model(items, name) if item["generative"]["pred"] is None]
        assert len(unread) == count
        if count:
            assert warned[name].startswith(f"{name}: {count} generated answers could not be parsed")
            assert warned[name] in report
        else:
            assert name not in warned


def test_decode_only_words_per_minute_is_the_measured_decode_rate_times_the_models_words_per_token(small_run):
    for model in read_results(small_run)["models"]:
        generative, decode = model["generative"], model["cost"]["generation"]["decode_tokens_per_s"]
        words_per_token = generative["mean_output_words"] / generative["mean_output_tokens"]
        assert generative["decode_words_per_minute"] == pytest.approx(60 * decode * words_per_token, rel=1e-12)


def test_noisy_timing_is_warned_exactly_where_a_points_spread_exceeds_ten_percent(small_run):
    """Spread is whatever this machine gave the run (two test workers on two cores make some); the contract is that
    every point over 10 % is flagged and warned, in results.json and the report, and no other point is."""
    results = read_results(small_run)
    warned = {
        (warning["model"], int(warning["message"].split(" at batch ")[1].split()[0]))
        for warning in results["warnings"]
        if warning["code"] == "noisy-timing"
    }
    report = (small_run / "report.md").read_text()
    for model in results["models"]:
        for point in model["cost"]["latency"]:
            times = point["times_s"]
            mean = sum(times) / len(times)
            cv = (sum((t - mean) ** 2 for t in times) / (len(times) - 1)) ** 0.5 / mean
            assert point["cv"] == pytest.approx(cv, rel=1e-9)
            assert point["noisy"] == (cv > 0.10)
            assert ((model["name"], point["batch_size"]) in warned) == point["noisy"]
            if point["noisy"]:
                assert f"{model['name']} latency at batch {point['batch_size']} varies by" in report


def test_one_recommendation_and_a_ci_gate_on_it(small_run, tmp_path):
    """`none` (KL 0, no memory saved) and bnb-nf4 (smaller, KL above 0) each beat the other on one quantity, so both
    are on the front; --fail-on turns the recommendation into the exit status after every file is written."""
    results = read_results(small_run)
    recommendation = results["recommendation"]
    standings = {s["name"]: s for s in recommendation["standings"]}
    assert list(standings) == ["none", "bnb-nf4"]
    for model in results["models"][1:]:
        standing = standings[model["name"]]
        assert standing["weight_bytes"] == model["cost"]["weights"]["counted_bytes"]
        assert standing["mean_kl"] == model["agreement"]["kl"]["mean"]
        assert standing["decision"] == model["verdict"]["decision"]
    assert standings["none"]["on_front"] and standings["bnb-nf4"]["on_front"]
    assert recommendation["outcome"] != "variant"  # none fails memory, and 8 questions cannot pass bnb-nf4
    failing = {"dont": recommendation["outcome"] == "reference", "inconclusive": True}
    # A pipeline that ships one variant gates on that variant's own verdict.
    failing |= {f"dont:{m['name']}": m["verdict"]["decision"] == "DON'T QUANTIZE" for m in results["models"][1:]}
    assert set(failing.values()) == {True, False}  # none fails on memory, bnb-nf4 is unclear on 8 questions

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    args = json.loads((small_run / "results.json").read_text())["config"]
    for level, fails in failing.items():
        result = quantcheck(
            "run", "--quant", "none", "--quant", "bnb-nf4", "--dataset", args["dataset"], "--out", str(run),
            "--batch-size", "3", "--max-new-tokens", "8", "--gen-batch-size", "4", "--cost-rounds", "1",
            *SMALL_COST, "--fail-on", level,
        )
        assert result.returncode == (1 if fails else 0), result.stderr[-2000:]
        assert (f"--fail-on {level}:" in result.stderr) == fails
        assert f"Recommendation: {recommendation['reason'][:40]}" in " ".join(result.stdout.split())
        assert (run / "report.html").is_file()
    unknown = quantcheck("run", "--quant", "none", "--out", str(tmp_path / "other"), "--fail-on", "dont:bnb-nf8")
    assert_one_line_error(unknown, "--fail-on names 'bnb-nf8', which is not a variant of this run: name one of none")


def test_quality_findings_are_printed_before_the_cost_phase_and_match_the_verdict(small_run):
    """Before minutes of cost, each variant's quality checks as the verdict later judges them."""
    log = (small_run.parent / "run.log").read_text().splitlines()
    first_cost = next(i for i, line in enumerate(log) if "(cost)" in line)
    results = read_results(small_run)
    for model in results["models"][1:]:
        checks = {name: outcome for name, outcome in model["verdict"]["checks"].items() if name != "memory"}
        expected = f"{model['name']}, quality before cost: " + ", ".join(f"{n} {o}" for n, o in checks.items())
        assert expected in log, [line for line in log if "before cost" in line]
        assert log.index(expected) < first_cost
        for name in checks:
            assert any(line.startswith(f"  {name}: ") for line in log[log.index(expected) :])


def test_a_declared_item_metric_reaches_results_csv_and_report(small_run):
    """`answer_delta_p`, declared once in metrics/item_metrics.py: recomputed here from items.jsonl's full-vocabulary
    answer-letter log-probabilities, it is results.json's value, metrics.csv's column and the report's cell."""
    import csv
    import math

    items = read_items(small_run)
    reference = {item["item_id"]: item for item in by_model(items, "reference")}
    results = read_results(small_run)
    csv_rows = {row["model"]: row for row in csv.DictReader((small_run / "metrics.csv").open())}
    markdown = (small_run / "report.md").read_text()
    assert "\u0394p of the correct answer [95% CI]" in markdown
    for name in ("none", "bnb-nf4"):
        deltas = []
        for item in by_model(items, name):
            letter = LETTERS.index(item["answer"])
            ref = reference[item["item_id"]]["loglik"]["choice_logprobs"][letter]
            deltas.append(math.exp(item["loglik"]["choice_logprobs"][letter]) - math.exp(ref))
        measured = next(m for m in results["models"] if m["name"] == name)["item_metrics"]["answer_delta_p"]
        assert measured["value"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-12) and measured["units"] == 8
        assert float(csv_rows[name]["answer_delta_p"]) == pytest.approx(measured["value"])
        if name == "none":
            assert measured["value"] == 0.0  # the reference's own weights: the same probabilities
        else:
            assert measured["value"] != 0.0 and measured["ci"]["low"] <= measured["value"] <= measured["ci"]["high"]
    assert next(m for m in results["models"] if m["name"] == "reference")["item_metrics"] == {}
