"""From the per-model files of a run folder to `results.json` and the merged `items.jsonl`.

This is the only place where per-item records become per-model numbers: metrics come from
`metrics/`, intervals and tests from `stats/`, the decision from `verdict`. It needs no model and
no torch, so a partial run can be summarised at any time.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from quantcheck.analysis.corpus import SpanText, corpus_statistics
from quantcheck.analysis.divergence import divergence_summary
from quantcheck.analysis.free_answers import free_answers
from quantcheck.analysis.recommend import recommend
from quantcheck.analysis.verdict import decide, fail_level, noisier_floor, quality_check_count, quality_checks
from quantcheck.metrics.item_metrics import ITEM_METRICS
from quantcheck.schema.models import ModelSpec
from quantcheck.schema.results import (
    DRIFT_TOLERANCE,
    QUANTCHECK_VERSION,
    AnswerRecord,
    CorpusStatistics,
    CostComparison,
    DatasetInfo,
    EngineInfo,
    Estimate,
    Floors,
    GeneratedAnswer,
    GenerationSettings,
    GenerativeQuality,
    ItemRecord,
    LoglikAnswer,
    MadeCheckpoint,
    ModelCost,
    ModelInfo,
    ModelResult,
    NumericFloor,
    PairedComparison,
    Phase,
    Preference,
    Results,
    RunWarning,
    SamplingComparison,
    SamplingFloor,
    Thresholds,
    TokenAgreement,
    WeightPlan,
    WindowRecord,
    undisturbed_rounds,
)
from quantcheck.stats.intervals import accuracy, bootstrap_mean, proportion
from quantcheck.stats.paired import compare_paired, compare_with_floor
from quantcheck.stats.speed import (
    decode_round_rates,
    decode_speedup_interval,
    latency_ratio_interval,
    latency_round_medians,
    spread,
)
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import read_latest_by_id, write_json_atomic, write_text_atomic
from quantcheck.tasks import Task, task_named

SMALL_SAMPLE = 300
NOISY_CV = 0.10
PHASE_LABELS = {
    "loglik": "log-likelihood scoring",
    "generation": "generative scoring",
    "cost": "cost",
    "corpus": "token scoring (text or prompts)",
    "answers": "the variant's own answers (prompts)",
}


def _ordered(records: dict[str, ItemRecord], item_ids: list[str]) -> list[ItemRecord]:
    return [records[item_id] for item_id in item_ids if item_id in records]


def _load_json(path: Path, model: type) -> object | None:
    return model.model_validate_json(path.read_text()) if path.exists() else None


def compared_records(records: list[ItemRecord]) -> list[ItemRecord]:
    """The records scored on the reference's token ids: the only ones with KL and Jaccard."""
    return [record for record in records if record.kl is not None and record.jaccard is not None]


def token_agreement(compared: list[ItemRecord], seed: int, level: float) -> TokenAgreement:
    """Next-token agreement: KL and top-1 with intervals at 95 % and at the verdict's `level`.

    From a compact reference store, KL is an estimate with per-item bounds: the lower bounds' mean
    gets intervals too (a 'fail' is judged on it), the upper bounds' mean is reported.

    Top-1 agreement is a proportion (Wilson); mean KL is heavy-tailed (`heavy_tailed_mean`); the
    Jaccard means are bounded and not judged, so a percentile bootstrap describes them.
    """
    kl = [record.kl for record in compared]
    bounded = all(record.kl_lower is not None for record in compared)
    lower_bound_method = next((record.kl_bound for record in compared if record.kl_bound), None)
    return TokenAgreement(
        n=len(compared),
        jaccard={
            k: bootstrap_mean([record.jaccard[k] for record in compared], seed)
            for k in compared[0].jaccard
            if all(k in record.jaccard for record in compared)
        },
        top1_agreement=proportion([bool(record.top1_agree) for record in compared], fail_level=level),
        kl=divergence_summary(
            kl,
            kl,
            [record.kl_lower for record in compared] if bounded else None,
            [record.kl_upper for record in compared],
            lower_bound_method,
            seed,
            level,
        ),
    )


def item_metrics(pairs: list[tuple[ItemRecord, ItemRecord]], seed: int) -> dict[str, Estimate]:
    """Each declared per-question metric (`metrics.item_metrics`): its mean over the questions where it is known."""
    found = {}
    for metric in ITEM_METRICS:
        values = [value for reference, variant in pairs if (value := metric.compute(reference, variant)) is not None]
        if values:
            found[metric.name] = bootstrap_mean(values, seed)
    return found


def generative_quality(records: list[ItemRecord], settings: GenerationSettings) -> GenerativeQuality:
    answers = [record.generative for record in records if record.generative is not None]
    seconds = sum(answer.seconds for answer in answers)
    words = [len(answer.text.split()) for answer in answers]
    tokens = [answer.new_tokens for answer in answers]
    return GenerativeQuality(
        accuracy=accuracy([answer.correct for answer in answers]),
        unparsable=sum(answer.pred is None for answer in answers),
        words_per_minute=60 * sum(words) / seconds if seconds else 0.0,
        tokens_per_second=sum(tokens) / seconds if seconds else 0.0,
        mean_output_tokens=statistics.fmean(tokens),
        mean_output_words=statistics.fmean(words),
        settings=settings,
    )


def merge_cost_rounds(rounds: list[ModelCost]) -> ModelCost:
    """One model's cost rounds as one: each latency point from its fastest undisturbed round, the best decode rate.

    Load on a shared machine only ever slows a measurement down, so the fastest round is the one
    least disturbed, and a round that others measurably disturbed is used only when every round was;
    every round's median (and timed iterations, which the ratio's interval resamples) is kept beside it.
    Memory and weights are round 1's.
    """
    first = rounds[0]
    points = []
    for point in first.latency:
        ok = [p for cost in rounds for p in cost.latency if p.batch_size == point.batch_size and p.status == "ok"]
        best = min(ok, key=lambda p: (p.disturbed, p.median_s)) if ok else point
        points.append(
            best.model_copy(
                update={
                    "round_medians_s": [p.median_s for p in ok],
                    "round_disturbed": [p.disturbed for p in ok],
                    "round_times_s": [p.times_s for p in ok],
                }
            )
        )
    generations = [cost.generation for cost in rounds if cost.generation is not None]
    generation = max(generations, key=lambda g: (not g.disturbed, g.decode_tokens_per_s)) if generations else None
    if generation is not None:
        generation = generation.model_copy(
            update={
                "round_decode_tokens_per_s": [g.decode_tokens_per_s for g in generations],
                "round_disturbed": [g.disturbed for g in generations],
                "round_decode_times_s": [g.decode_times_s for g in generations],
                "round_decode_tokens": [g.decode_tokens for g in generations],
            }
        )
    return first.model_copy(update={"latency": points, "generation": generation, "rounds": len(rounds)})


def _moved(disturbed: bool, rounds: list[float], round_disturbed: list[bool]) -> bool:
    """Disturbed in every round, or the undisturbed rounds differ by more than the drift tolerance."""
    clean = undisturbed_rounds(rounds, round_disturbed, disturbed)
    return disturbed or bool(clean and max(clean) > DRIFT_TOLERANCE * min(clean))


def _unstable(*costs: ModelCost) -> list[int]:
    return sorted(
        {
            point.batch_size
            for cost in costs
            for point in cost.latency
            if point.status == "ok" and _moved(point.disturbed, point.round_medians_s, point.round_disturbed)
        }
    )


def _decode_unstable(*costs: ModelCost) -> bool:
    return any(
        _moved(g.disturbed, g.round_decode_tokens_per_s, g.round_disturbed)
        for g in (cost.generation for cost in costs)
        if g is not None
    )


def cost_comparison(reference: ModelCost, variant: ModelCost) -> CostComparison | None:
    """Ratios of what both models measured; None when a served model's weight memory is unknown."""
    reference_bytes, variant_bytes = reference.weight_bytes, variant.weight_bytes
    if reference_bytes is None or variant_bytes is None:
        return None
    ratio = variant_bytes / reference_bytes
    reference_latency = {point.batch_size: point.median_s for point in reference.latency if point.status == "ok"}
    latency_ratio = {
        point.batch_size: point.median_s / reference_latency[point.batch_size]
        for point in variant.latency
        if point.status == "ok" and point.batch_size in reference_latency and point.median_s
    }
    reference_points = {point.batch_size: point for point in reference.latency if point.status == "ok"}
    variant_points = {point.batch_size: point for point in variant.latency if point.status == "ok"}
    latency_ci = {
        size: latency_ratio_interval(reference_points[size], variant_points[size], value)
        for size, value in latency_ratio.items()
    }
    latency_spread = {
        size: max(
            spread(latency_round_medians(reference_points[size])), spread(latency_round_medians(variant_points[size]))
        )
        for size in latency_ratio
    }
    decode = decode_ci = decode_spread = None
    if reference.generation and variant.generation and reference.generation.decode_tokens_per_s:
        decode = variant.generation.decode_tokens_per_s / reference.generation.decode_tokens_per_s
        decode_ci = decode_speedup_interval(reference.generation, variant.generation, decode)
        decode_spread = max(
            spread(decode_round_rates(reference.generation)), spread(decode_round_rates(variant.generation))
        )
    return CostComparison(
        weight_memory_ratio=ratio,
        memory_saving=1 - ratio,
        latency_ratio=latency_ratio,
        decode_speedup=decode,
        weight_memory_stated=reference.weights is None or variant.weights is None,
        unstable_batch_sizes=_unstable(reference, variant),
        decode_unstable=_decode_unstable(reference, variant),
        latency_ratio_ci=latency_ci,
        latency_round_spread=latency_spread,
        decode_speedup_ci=decode_ci,
        decode_round_spread=decode_spread,
    )


def _errors(folder: RunFolder, name: str) -> dict[str, str]:
    """The message of each failed job of this model, by job kind (quality, cost)."""
    return {
        path.name.split(".")[0]: json.loads(path.read_text())["message"]
        for path in sorted((folder.models_dir / name).glob("*.error.json"))
    }


def _gaps(
    expected: dict[str, bool],
    n_items: int,
    quality: list[ItemRecord],
    generated: list[ItemRecord],
    cost: ModelCost | None,
    errors: dict[str, str],
    windows: tuple[int, int] = (0, 0),
    answers: tuple[int, int] | None = None,
) -> dict[Phase, str]:
    """The phases that were asked for but failed or stopped part-way, each with what happened.

    `windows`: a text corpus's windows scored by this model, and its windows (0 when the reference never cut them);
    `answers`: in a prompts run, the prompts a variant answered itself, and the prompts."""
    gaps: dict[Phase, str] = {}
    quality_error = f" (quality job: {errors['quality']})" if "quality" in errors else ""
    for phase, (scored, total) in [("corpus", windows), *([("answers", answers)] if answers else [])]:
        if expected.get(phase) and (scored < total or not total):
            gaps[phase] = (
                f"{PHASE_LABELS[phase]} stopped after {scored} of {total} sequences{quality_error}"
                if scored
                else f"{PHASE_LABELS[phase]} has no results{quality_error}"
            )
    for phase, records in (("loglik", quality), ("generation", generated)):
        if not expected.get(phase) or len(records) >= n_items:
            continue
        if records:
            gaps[phase] = (
                f"{PHASE_LABELS[phase]} stopped after {len(records)} of {n_items} questions{quality_error}, "
                "a biased subset (the longest questions are scored first)"
            )
        else:
            gaps[phase] = f"{PHASE_LABELS[phase]} has no results{quality_error}"
    if expected.get("cost") and cost is None:
        gaps["cost"] = "cost was not measured" + (f" (cost job: {errors['cost']})" if "cost" in errors else "")
    return gaps


COST_PENDING = "cost is being measured now: the verdict waits for it"


def read_windows(folder: RunFolder, spec: ModelSpec) -> list[WindowRecord]:
    """A model's text-corpus records, in window order (the latest copy of a window redone after a crash)."""
    records = read_latest_by_id(folder.model_file(spec.folder, "corpus.jsonl"), WindowRecord, key="window")
    return [records[window] for window in sorted(records)]


def read_own_answers(folder: RunFolder, spec: ModelSpec) -> list[AnswerRecord]:
    """A variant's own answers to a prompts run's prompts, in prompt order."""
    records = read_latest_by_id(folder.model_file(spec.folder, "answers.jsonl"), AnswerRecord, key="prompt")
    return [records[prompt] for prompt in sorted(records)]


def _span_text(folder: RunFolder, task: Task) -> SpanText | None:
    """Each sequence's name and the text of its scored tokens, as the reference's worker wrote them."""
    if not (folder.reference_dir / "scored.json").exists():
        return None
    _, token_texts = folder.read_scored_spans()
    return SpanText(task.sequence_names(folder, len(token_texts)), token_texts)


def _model_result(
    folder: RunFolder,
    spec: ModelSpec,
    description: str,
    item_ids: list[str],
    expected: dict[str, bool],
    cost_rounds: int,
    windows: tuple[int, int] = (0, 0),
    answers: tuple[int, int] | None = None,
) -> tuple[ModelResult, list[ItemRecord], list[ItemRecord]]:
    """One model's own numbers; `windows`: the sequences it scored of a text or prompts run, and the run's sequences;
    `answers`: the prompts a variant answered itself, and the prompts."""
    name = spec.folder
    quality = _ordered(read_latest_by_id(folder.model_file(name, "quality.jsonl"), ItemRecord), item_ids)
    generated = _ordered(read_latest_by_id(folder.model_file(name, "generation.jsonl"), ItemRecord), item_ids)
    result = ModelResult(
        name=spec.name,
        role=spec.role,
        backend=spec.backend,
        quant=None if spec.is_reference else spec.method,
        description=description,
    )
    errors = _errors(folder, name)
    result.errors = [f"{kind}: {message}" for kind, message in errors.items()]
    result.engine = _load_json(folder.model_file(name, "engine.json"), EngineInfo)
    result.engine_floor = _load_json(folder.engine_floor_file(name), NumericFloor)
    result.made = _load_json(folder.model_file(name, "made.json"), MadeCheckpoint)
    result.precision = result.engine.precision if result.engine else None
    rounds = [
        cost
        for cost_round in range(1, max(cost_rounds, 1) + 1)
        if (cost := _load_json(folder.cost_file(name, cost_round), ModelCost)) is not None
    ]
    result.cost = merge_cost_rounds(rounds) if rounds else None
    if quality:
        result.loglik = accuracy([record.loglik.correct for record in quality])
    settings = _load_json(folder.model_file(name, "generation-settings.json"), GenerationSettings)
    if generated and settings is not None:
        result.generative = generative_quality(generated, settings)
    if result.generative and result.cost and result.cost.generation and result.generative.mean_output_tokens:
        words_per_token = result.generative.mean_output_words / result.generative.mean_output_tokens
        result.generative.decode_words_per_minute = 60 * result.cost.generation.decode_tokens_per_s * words_per_token
    result.incomplete = _gaps(expected, len(item_ids), quality, generated, result.cost, errors, windows, answers)
    measured = quality or generated or windows[0] or result.cost
    result.status = "failed" if errors and not measured else "partial" if errors or result.incomplete else "ok"
    return result, quality, generated


def _merge_records(quality: list[ItemRecord], generated: list[ItemRecord], item_ids: list[str]) -> list[ItemRecord]:
    """One `items.jsonl` line per item and model: the scoring record with the generated answer folded in."""
    quality_by_id = {record.item_id: record for record in quality}
    generated_by_id = {record.item_id: record for record in generated}
    merged = []
    for item_id in item_ids:
        record, answer = quality_by_id.get(item_id), generated_by_id.get(item_id)
        if record is not None and answer is not None:
            record = record.model_copy(update={"generative": answer.generative})
        if record is not None or answer is not None:
            merged.append(record or answer)
    return merged


def _pairs(reference: list[ItemRecord], variant: list[ItemRecord]) -> list[tuple[ItemRecord, ItemRecord]]:
    """(reference, variant) records of the items both scored."""
    by_id = {record.item_id: record for record in reference}
    return [(by_id[record.item_id], record) for record in variant if record.item_id in by_id]


def _paired(
    pairs: list[tuple[ItemRecord, ItemRecord]],
    answer: Callable[[ItemRecord], LoglikAnswer | GeneratedAnswer],
    level: float,
) -> PairedComparison | None:
    if not pairs:
        return None
    return compare_paired(
        [answer(ref).correct for ref, _ in pairs],
        [answer(var).correct for _, var in pairs],
        [answer(ref).pred for ref, _ in pairs],
        [answer(var).pred for _, var in pairs],
        fail_level=level,
    )


def _compare(
    result: ModelResult,
    reference: ModelResult,
    records: tuple[list[ItemRecord], list[ItemRecord]],
    reference_records: tuple[list[ItemRecord], list[ItemRecord]],
    seed: int,
) -> None:
    """A variant against the reference: paired accuracy and agreement at the verdict's level, the
    reference's gaps (they bias the comparison too), cost ratios."""
    loglik_pairs = _pairs(reference_records[0], records[0])
    generative_pairs = _pairs(reference_records[1], records[1])
    compared = compared_records(records[0])
    level = fail_level(quality_check_count(bool(loglik_pairs), bool(generative_pairs), bool(compared)))
    result.paired_loglik = _paired(loglik_pairs, lambda record: record.loglik, level)
    result.paired_generative = _paired(generative_pairs, lambda record: record.generative, level)
    if compared:
        result.agreement = token_agreement(compared, seed, level)
    result.item_metrics = item_metrics(loglik_pairs, seed)
    for phase, gap in reference.incomplete.items():
        if gap == COST_PENDING:
            continue  # the run's cost phase is still to come for every model: not a gap of the reference's
        result.incomplete[phase] = "; ".join(filter(None, [result.incomplete.get(phase), f"the reference's {gap}"]))
    if reference.cost and result.cost:
        result.cost_vs_reference = cost_comparison(reference.cost, result.cost)


def _floors(
    folder: RunFolder,
    floors: list[ModelSpec],
    reference: tuple[list[ItemRecord], list[ItemRecord]],
    item_ids: list[str],
) -> tuple[Floors, list[ItemRecord], list[str]]:
    """The reference's sampling noise, from its answers sampled again; the resampled answers, for the variants'
    comparison; and the floors not measured (a failed or unfinished re-run), for `Results.missing`. (The numeric
    floor is each model's own, `ModelResult.engine_floor`.)"""
    result = Floors()
    resampled: list[ItemRecord] = []
    for spec in floors:
        resampled = _ordered(
            read_latest_by_id(folder.model_file(spec.folder, "generation.jsonl"), ItemRecord), item_ids
        )
        pairs = _pairs(reference[1], resampled)
        if pairs and len(pairs) == len(item_ids):
            settings = _load_json(folder.model_file(spec.folder, "generation-settings.json"), GenerationSettings)
            differs = sum(
                ref.generative.pred is None or ref.generative.pred != again.generative.pred for ref, again in pairs
            )
            result.sampling = SamplingFloor(
                n=len(pairs), seed=settings.seed if settings else -1, disagreements=differs, rate=differs / len(pairs)
            )
        else:
            resampled = []
    missing = [_floor_gap(folder, spec) for spec in floors if result.sampling is None]
    return result, resampled, missing


def _floor_gap(folder: RunFolder, spec: ModelSpec) -> str:
    """`NAME: noise floor`, with the job's error when it failed."""
    error = _errors(folder, spec.folder).get("quality")
    return f"{spec.name}: noise floor" + (f" (quality job: {error})" if error else "")


def _against_floor(
    reference: list[ItemRecord], variant: list[ItemRecord], floor: list[ItemRecord]
) -> SamplingComparison | None:
    """The variant's generated-answer disagreement against the reference's own, on the items all three answered."""
    variant_by_id, floor_by_id = {r.item_id: r for r in variant}, {r.item_id: r for r in floor}
    rows = [
        (ref, variant_by_id[ref.item_id], floor_by_id[ref.item_id])
        for ref in reference
        if ref.item_id in variant_by_id and ref.item_id in floor_by_id
    ]
    if not rows:
        return None
    answers = [[(record.generative.pred, record.generative.correct) for record in column] for column in zip(*rows)]
    return compare_with_floor(*answers)


def variant_corpus_statistics(
    reference: list[WindowRecord],
    variant: list[WindowRecord],
    context: int | None,
    seed: int,
    spans: SpanText | None = None,
) -> tuple[CorpusStatistics, TokenAgreement | None]:
    """A variant's token-level statistics, its agreement's intervals at the verdict's level. The level counts the KL
    check when any sequence has KL: an empty answer (a prompt the reference ended at once) has none and is skipped."""
    level = fail_level(quality_check_count(False, False, any(window.kl is not None for window in variant)))
    return corpus_statistics(reference, variant, context, seed, level, spans)


FEW_WINDOWS = 30


def _warnings(results: Results, n_items: int, folder: RunFolder, spec_folders: dict[str, str]) -> list[RunWarning]:
    warnings: list[RunWarning] = []
    reference = results.models[0]
    if (task := task_named(results.dataset.kind)).every_token:
        unit = task.unit
        if n_items < FEW_WINDOWS:
            warnings.append(
                RunWarning(
                    code="small-sample",
                    message=f"only {n_items} {unit}: the intervals, which resample whole {unit}, are wide",
                )
            )
    elif n_items < SMALL_SAMPLE:
        warnings.append(
            RunWarning(
                code="small-sample",
                message=(
                    f"only {n_items} questions: accuracy intervals are wide "
                    "(see each variant's minimum detectable difference)"
                ),
            )
        )
    for result in results.models:
        if result.precision and result.precision.offloaded:
            warnings.append(
                RunWarning(
                    code="offloaded",
                    model=result.name,
                    message=(
                        f"{result.name} is partly offloaded ({', '.join(result.precision.devices)}): "
                        "its cost figures do not describe a model on one device"
                    ),
                )
            )
        if (
            result is not reference
            and result.engine
            and reference.engine
            and result.engine.compute_dtype != reference.engine.compute_dtype
            and "unknown" not in (result.engine.compute_dtype, reference.engine.compute_dtype)
        ):  # a server does not say
            warnings.append(
                RunWarning(
                    code="precision-mismatch",
                    model=result.name,
                    message=(
                        f"{result.name} computes in {result.engine.compute_dtype}, "
                        f"the reference in {reference.engine.compute_dtype}: "
                        "part of any speed or quality difference comes from that, not from quantization"
                    ),
                )
            )
        for point in result.cost.latency if result.cost else []:
            if point.noisy:
                warnings.append(
                    RunWarning(
                        code="noisy-timing",
                        model=result.name,
                        message=(
                            f"{result.name} latency at batch {point.batch_size} varies by {point.cv:.0%} "
                            f"(coefficient of variation > {NOISY_CV:.0%}): treat its ratio with care"
                        ),
                    )
                )
        if result is not reference and result.corpus and result.agreement is None:
            warnings.append(
                RunWarning(
                    code="tokenizer-mismatch",
                    model=result.name,
                    message=(
                        f"{result.name} tokenizes the corpus differently from the reference: "
                        "KL, top-1 agreement and delta-p are not computed for it (they need identical token ids); "
                        "its perplexity is, on its own tokens"
                    ),
                )
            )
        if result is not reference and result.loglik and result.agreement is None:
            warnings.append(
                RunWarning(
                    code="tokenizer-mismatch",
                    model=result.name,
                    message=(
                        f"{result.name} tokenizes the prompts differently from the reference: "
                        "KL, Jaccard and top-1 agreement are not computed for it (they need identical token ids); "
                        "accuracy is compared"
                    ),
                )
            )
        if result.engine and result.engine.parallel.get("tokenizer_check") == "unverified":
            warnings.append(
                RunWarning(
                    code="tokenizer-unverified",
                    model=result.name,
                    message=(
                        f"{result.name}: the server's tokenizer could not be checked against the local one "
                        "(no /tokenize, no echo): its comparisons may rest on other token ids, "
                        "so no variant is judged QUANTIZE on them"
                    ),
                )
            )
        if (skipped := folder.engine_floor_skip_file(spec_folders[result.name])).exists():
            warnings.append(
                RunWarning(
                    code="engine-floor",
                    model=result.name,
                    message=(
                        f"{result.name}: its engine's numeric floor was not measured ({skipped.read_text().strip()}): "
                        "its KL and top-1 are judged without it"
                    ),
                )
            )
        if result.generative and result.generative.unparsable:
            warnings.append(
                RunWarning(
                    code="unparsable-answers",
                    model=result.name,
                    message=(
                        f"{result.name}: {result.generative.unparsable} generated answers could not be parsed; "
                        "they count as wrong and are listed in the report"
                    ),
                )
            )
    return warnings


def summarize(
    root: Path,
    *,
    config: dict[str, object],
    model: ModelInfo,
    dataset: DatasetInfo,
    environment: dict[str, object],
    models: list[ModelSpec],
    descriptions: dict[str, str],
    floors: list[ModelSpec] = (),
    cost_rounds: int = 1,
    thresholds: Thresholds,
    prefer: Preference = "memory",
    fit_gb: float | None = None,
    seed: int,
    extra_warnings: list[RunWarning],
    expected: dict[str, bool],
    cost_pending: bool = False,
    planned: dict[str, WeightPlan] | None = None,
) -> Results:
    """Build `results.json` and the merged `items.jsonl` from whatever the folder holds now. `descriptions`: each
    model's name to what its engine says it is (`backends.variants.describe`), so that reading a run needs no engine.
    `cost_pending`: written between the quality and the cost phase; no verdict yet (the memory check needs cost), and
    `early_findings` says what quality alone shows."""
    folder = RunFolder(root)
    task = task_named(dataset.kind)
    corpus = task.every_token
    item_ids = [] if corpus else [item.item_id for item in folder.read_items()]
    results = Results(
        tool_version=QUANTCHECK_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment,
        config=config,
        model=model,
        dataset=dataset,
        thresholds=thresholds,
    )
    merged: list[ItemRecord] = []
    per_model: dict[str, tuple[list[ItemRecord], list[ItemRecord]]] = {}
    windows = {spec.name: read_windows(folder, spec) for spec in models} if corpus else {}
    own = {spec.name: read_own_answers(folder, spec) for spec in models[1:]} if expected.get("answers") else {}
    for spec in models:
        result, quality, generated = _model_result(
            folder,
            spec,
            descriptions[spec.name],
            item_ids,
            expected,
            cost_rounds,
            (len(windows[spec.name]) if expected.get("corpus") else 0, dataset.n_items),
            (len(own[spec.name]), dataset.n_items) if spec.name in own else None,
        )
        result.planned_weights = (planned or {}).get(spec.name)
        results.models.append(result)
        per_model[spec.name] = (quality, generated)
        merged.extend(_merge_records(quality, generated, item_ids))
    reference = results.models[0]
    results.floors, floor_answers, missing_floors = _floors(folder, floors, per_model[reference.name], item_ids)
    results.floors.numeric = reference.engine_floor
    if cost_pending:
        for result in results.models:
            if "cost" in result.incomplete:
                result.incomplete["cost"] = COST_PENDING
    results.missing = [
        f"{result.name}: {PHASE_LABELS[phase]}" for result in results.models for phase in result.incomplete
    ] + missing_floors
    results.finished = not results.missing
    reference_windows = windows.get(models[0].name, [])
    spans = _span_text(folder, task) if reference_windows else None
    if reference_windows:
        reference.corpus = corpus_statistics(reference_windows, None, dataset.context, seed)[0]
    reference_answers = None  # a prompts run's reference answers, read once for every variant's own
    for spec, result in zip(models[1:], results.models[1:]):
        _compare(result, reference, per_model[result.name], per_model[reference.name], seed)
        if reference_windows and (variant_windows := windows[spec.name]):
            result.corpus, result.agreement = variant_corpus_statistics(
                reference_windows, variant_windows, dataset.context, seed, spans
            )
        if spans and len(own.get(spec.name, [])) == dataset.n_items:
            reference_answers = reference_answers or json.loads((folder.reference_dir / "answers.json").read_text())
            result.free_answers = free_answers(
                reference_answers["answers"],
                spans.token_texts,
                own[spec.name],
                reference_answers["settings"]["max_new_tokens"],
                spans.names,
            )
        if floor_answers and per_model[result.name][1]:
            result.generative_vs_floor = _against_floor(
                per_model[reference.name][1], per_model[result.name][1], floor_answers
            )
        unmeasured = [
            model.name for model in (reference, result) if model.cost is not None and model.cost.weight_bytes is None
        ]
        unverified = [
            model.name for model in (reference, result) if model.engine and model.engine.tokenizer_verified is False
        ]
        result.verdict = None if cost_pending else decide(
            result,
            thresholds,
            unmeasured_memory=unmeasured,
            unit=task.unit,
            numeric_floor=noisier_floor(reference.engine_floor, result.engine_floor),
            unverified_tokenizers=unverified,
        )
    results.warnings = extra_warnings + _warnings(
        results, dataset.n_items, folder, {spec.name: spec.folder for spec in models}
    )
    results.recommendation = recommend(results, prefer, fit_gb)
    write_text_atomic(root / "items.jsonl", "".join(record.model_dump_json() + "\n" for record in merged))
    write_json_atomic(root / "results.json", results)
    return results


def early_findings(results: Results) -> list[str]:
    """Each variant's quality checks, judged as the verdict will judge them, for the lines a run prints before its
    cost phase: the quality findings minutes early, the verdict itself only once cost is in."""
    reference = results.models[0]
    unit = task_named(results.dataset.kind if results.dataset else "questions").unit
    lines = []
    for variant in results.models[1:]:
        checks = quality_checks(
            variant,
            results.thresholds,
            unit=unit,
            numeric_floor=noisier_floor(reference.engine_floor, variant.engine_floor),
        )
        if not checks:
            continue
        lines.append(f"{variant.name}, quality before cost: " + ", ".join(f"{c.name} {c.outcome}" for c in checks))
        lines += [f"  {c.name}: {c.reason}" for c in checks]
    return lines
