"""summarize on run folders written the way the workers write them: a phase that was asked for
but crashed, ran out of memory or stopped part-way never lets a variant reach QUANTIZE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantcheck.analysis.summarize import summarize
from quantcheck.schema.models import ModelSpec
from quantcheck.schema.results import (
    DatasetInfo,
    GeneratedAnswer,
    GenerationSettings,
    ItemRecord,
    LoglikAnswer,
    ModelCost,
    ModelInfo,
    ModelResult,
    Results,
    Thresholds,
    WeightMemory,
)
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import append_records, read_records, write_json_atomic

N_ITEMS = 400
VARIANT = "int8"
OOM = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"


def _quality(model: str, item: int, rng: np.random.Generator) -> ItemRecord:
    """Both models answer item i the same way (right on 3 items in 5); the variant's KL is small."""
    pred = "A" if item % 5 < 3 else "B"
    record = ItemRecord(
        item_id=f"q{item:04d}",
        model=model,
        answer="A",
        loglik=LoglikAnswer(pred=pred, correct=pred == "A", choice_logprobs=[-0.1, -2.0, -3.0, -4.0]),
    )
    if model != "reference":
        record.kl = float(rng.lognormal(np.log(1e-3), 1.0))
        record.jaccard = {k: 1.0 for k in (1, 2, 3, 5, 10, 20)}
        record.top1_agree = True
    return record


def _generated(model: str, item: int) -> ItemRecord:
    pred = "A" if item % 5 < 3 else "C"
    answer = GeneratedAnswer(text=f"The answer is {pred}.", pred=pred, correct=pred == "A", new_tokens=5, seconds=0.1)
    return ItemRecord(item_id=f"q{item:04d}", model=model, answer="A", generative=answer)


def _cost(weight_bytes: int) -> ModelCost:
    weights = WeightMemory(
        counted_bytes=weight_bytes,
        footprint_bytes=weight_bytes,
        parameters=10**6,
        bits_per_parameter=8 * weight_bytes / 10**6,
        footprint_agrees=True,
    )
    return ModelCost(memory_method="counted", threads=2, load_time_s=1.0, weights=weights)


def write_run(
    root: Path,
    scored: int = N_ITEMS,
    generated: int = N_ITEMS,
    cost: bool = True,
    quality_error: str | None = None,
    cost_error: str | None = None,
) -> RunFolder:
    """A run folder as the workers leave it; the variant stops after `scored` / `generated` items."""
    folder = RunFolder(root)
    root.mkdir(parents=True)
    folder.dataset_file.write_text(
        "".join(
            json.dumps(
                {
                    "item_id": f"q{i:04d}",
                    "subject": "s",
                    "question": f"question {i}",
                    "choices": ["w", "x", "y", "z"],
                    "answer": "A",
                }
            )
            + "\n"
            for i in range(N_ITEMS)
        )
    )
    settings = GenerationSettings(
        prompt_style="plain", temperature=0.0, greedy=True, max_new_tokens=8, seed=0, instruction="Answer."
    )
    rng = np.random.default_rng(0)
    for model, n_scored, n_generated, weight_bytes in (
        ("reference", N_ITEMS, N_ITEMS, 2000),
        (VARIANT, scored, generated, 1000),
    ):
        append_records(folder.model_file(model, "quality.jsonl"), [_quality(model, i, rng) for i in range(n_scored)])
        write_json_atomic(folder.model_file(model, "generation-settings.json"), settings)
        if n_generated:
            append_records(
                folder.model_file(model, "generation.jsonl"), [_generated(model, i) for i in range(n_generated)]
            )
        if cost or model == "reference":
            write_json_atomic(folder.model_file(model, "cost.json"), _cost(weight_bytes))
    for kind, message in (("quality", quality_error), ("cost", cost_error)):
        if message:
            write_json_atomic(folder.model_file(VARIANT, f"{kind}.error.json"), {"message": message})
    return folder


def run_summary(root: Path, floors: list[ModelSpec] = ()) -> Results:
    return summarize(
        root,
        config={},
        model=ModelInfo(name="m", source="local", path="m", reference_dtype="bfloat16", device="cpu"),
        dataset=DatasetInfo(
            spec="test",
            n_items=N_ITEMS,
            subjects=["s"],
            source="test",
            content_hash="0",
            prompt_format="test",
            answer_continuations=[" A", " B", " C", " D"],
        ),
        environment={},
        models=[
            ModelSpec(name="reference", role="reference", backend="hf", method="none", weights="m"),
            ModelSpec(name=VARIANT, role="variant", backend="hf", method="bnb-int8", weights="m"),
        ],
        descriptions={"reference": "the reference", VARIANT: "bitsandbytes int8"},
        floors=list(floors),
        thresholds=Thresholds(),
        seed=0,
        extra_warnings=[],
        expected={"loglik": True, "generation": True, "cost": True},
    )


def test_complete_run_quantizes(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    results = run_summary(tmp_path / "run")
    variant = results.models[1]
    assert variant.status == "ok" and variant.incomplete == {}
    assert variant.verdict.decision == "QUANTIZE"
    assert results.finished and results.missing == []
    stored = Results.model_validate_json((tmp_path / "run" / "results.json").read_text())
    assert stored.models[1].verdict == variant.verdict
    # the intervals are the ones the verdict needs: Wilson top-1, heavy-tailed KL, all at 1 - 0.05/4
    assert variant.agreement.top1_agreement.ci.method == "wilson"
    assert variant.agreement.kl.mean.ci.method.startswith("bootstrap-t")
    assert variant.verdict.fail_level == pytest.approx(0.9875) == variant.agreement.kl.mean.fail_ci.level


def test_a_floor_that_failed_or_stopped_is_missing_not_silently_dropped(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    sampling = ModelSpec(
        name="reference (sampled again)", role="floor", backend="llamacpp", method="none", weights="m", floor="sampling"
    )
    write_json_atomic(
        folder.model_file(sampling.folder, "quality.error.json"), {"message": "AttributeError: no GGUF type 'none'"}
    )
    append_records(
        folder.model_file(sampling.folder, "generation.jsonl"),
        [_generated(sampling.name, i) for i in range(N_ITEMS // 2)],
    )
    results = run_summary(tmp_path / "run", floors=[sampling])
    assert results.floors.numeric is None and results.floors.sampling is None
    assert results.missing == [
        "reference (sampled again): noise floor (quality job: AttributeError: no GGUF type 'none')"
    ]
    assert not results.finished


def test_generation_out_of_memory_is_inconclusive(tmp_path: Path) -> None:
    """Out of memory on the first generation batch: no generated answers at all."""
    write_run(tmp_path / "run", generated=0, quality_error=OOM)
    results = run_summary(tmp_path / "run")
    variant = results.models[1]
    assert variant.status == "partial"
    assert variant.incomplete == {"generation": f"generative scoring has no results (quality job: {OOM})"}
    assert variant.verdict.decision == "INCONCLUSIVE"
    assert (
        f"generative scoring has no results (quality job: {OOM}): not judged (generated-answer accuracy)"
        in variant.verdict.reasons
    )
    assert results.missing == [f"{VARIANT}: generative scoring"] and not results.finished


def test_partial_loglik_pass_is_inconclusive(tmp_path: Path) -> None:
    """A crash after 300 of 400 items: what was scored looks perfect, but it is a biased subset."""
    write_run(tmp_path / "run", scored=300, quality_error="RuntimeError: worker killed")
    variant = run_summary(tmp_path / "run").models[1]
    assert variant.paired_loglik.n == 300
    assert variant.incomplete["loglik"].startswith("log-likelihood scoring stopped after 300 of 400 questions")
    assert variant.verdict.decision == "INCONCLUSIVE"
    assert {"log-likelihood accuracy", "mean KL", "top-1 agreement"}.isdisjoint(variant.verdict.checks)


def test_failed_cost_job_is_inconclusive_with_its_message(tmp_path: Path) -> None:
    write_run(tmp_path / "run", cost=False, cost_error=OOM)
    variant = run_summary(tmp_path / "run").models[1]
    assert variant.verdict.decision == "INCONCLUSIVE"
    assert variant.verdict.reasons[0] == f"cost was not measured (cost job: {OOM}): the memory saving is not known"


def test_a_partial_reference_holds_back_every_variant(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    generation = folder.model_file("reference", "generation.jsonl")
    generation.write_text("".join(generation.read_text().splitlines(keepends=True)[:100]))
    results = run_summary(tmp_path / "run")
    assert results.models[0].incomplete["generation"].startswith("generative scoring stopped after 100 of 400")
    variant = results.models[1]
    assert variant.incomplete["generation"].startswith("the reference's generative scoring stopped after 100 of 400")
    assert variant.verdict.decision == "INCONCLUSIVE"
    assert results.missing == ["reference: generative scoring"]


def test_kl_from_a_compact_store_is_summarised_with_its_bounds(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "run")
    path = folder.model_file(VARIANT, "quality.jsonl")
    records = list(read_records(path, ItemRecord))
    for record in records:
        record.kl_lower, record.kl_upper = 0.9 * record.kl, record.kl + 0.5
    path.write_text("".join(record.model_dump_json() + "\n" for record in records))
    kl = run_summary(tmp_path / "run").models[1].agreement.kl
    assert kl.store == "compact"
    assert kl.lower.value == pytest.approx(0.9 * kl.mean.value) and kl.lower.fail_ci.level == pytest.approx(0.9875)
    assert kl.upper_mean == pytest.approx(kl.mean.value + 0.5)
    records[7].kl_upper = None  # unbounded on one item: no finite mean
    path.write_text("".join(record.model_dump_json() + "\n" for record in records))
    assert run_summary(tmp_path / "run").models[1].agreement.kl.upper_mean is None


def test_an_empty_first_answer_is_skipped_not_fatal() -> None:
    """Defect 6 of #24: a prompts run took the interval level from the first sequence's KL, None for an empty answer
    (a prompt the reference ends at once, recorded with no scored tokens as the scorer records it), so the intervals
    were made at 95 % and the verdict, which needs them at its Bonferroni level, raised after all the scoring."""
    from quantcheck.analysis.summarize import variant_corpus_statistics
    from quantcheck.analysis.verdict import decide
    from quantcheck.schema.results import WindowRecord

    rng = np.random.default_rng(0)
    reference = [WindowRecord(window=0, model="reference", nll=[])]
    variant = [WindowRecord(window=0, model="int8", nll=[])]
    for window in range(1, 13):
        nll = rng.exponential(1.0, 8).tolist()
        reference.append(WindowRecord(window=window, model="reference", nll=nll))
        variant.append(
            WindowRecord(
                window=window,
                model="int8",
                nll=[value + 0.01 for value in nll],
                kl=rng.lognormal(np.log(1e-3), 1.0, 8).tolist(),
                top1_agree=[True] * 8,
                jaccard={k: 1.0 for k in (1, 5)},
            )
        )
    corpus, agreement = variant_corpus_statistics(reference, variant, 64, 0)
    assert corpus.windows == 12 and agreement.n == 96 and agreement.kl.mean.units == 12
    result = ModelResult(name="int8", description="", status="ok", corpus=corpus, agreement=agreement)
    verdict = decide(result, Thresholds(), unit="prompts")
    assert verdict.checks["mean KL"] == "pass" and verdict.checks["top-1 agreement"] == "pass"
