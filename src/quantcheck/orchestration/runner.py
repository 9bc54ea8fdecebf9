"""`quantcheck run`: validate everything, then run each model's jobs in fresh processes, then summarise.

Order matters: every check that can fail on user input runs before any model loads; the
reference's quality pass runs first (the variants replay its stored outputs); a failed variant is
recorded and the others go on; finished work on disk is never recomputed.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError
from rich.markup import escape

from quantcheck.analysis import format as fmt
from quantcheck.backends import engine_defaults
from quantcheck.data.corpus import KLD_PREFIX
from quantcheck.data.load import DEFAULT_DATASET
from quantcheck.data.prompts import LOGLIK_FORMAT
from quantcheck.errors import QuantcheckError
from quantcheck.models.loading import ResolvedModel
from quantcheck.models.plan import DTYPE_BYTES, ModelShape, read_config
from quantcheck.orchestration.launcher import Launcher
from quantcheck.orchestration.progress import ProgressView
from quantcheck.schema.jobs import EngineTables, JobSpec
from quantcheck.schema.models import Calibration, CorpusJob, GenerationOptions, MakeSettings, ModelSpec
from quantcheck.schema.results import (
    GIB,
    QUANTCHECK_VERSION,
    SCORES_VERSION,
    Preference,
    Results,
    RunPlan,
    RunWarning,
    Thresholds,
    WeightPlan,
)
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.lock import RunLock
from quantcheck.storage.store import StoreSettings, refuse_top_k_reference, write_json_atomic
from quantcheck.tasks import DataRequest, QualityRequest, Task, task_for
from quantcheck.tasks.base import Data


class Interrupted(QuantcheckError):
    exit_code = 130


class RunOptions(BaseModel):
    """Everything `quantcheck run` takes, as the runner uses it (built by `RunConfig.options`); recorded in
    results.json as the run's config."""

    model: str | None = None
    backend: str = "hf"
    reference_url: str | None = None
    reference_kld: str | None = None
    quants: list[str] = Field(default_factory=list)
    calibration: Calibration = Calibration()
    engine: EngineTables = Field(default_factory=engine_defaults)
    dataset: str = DEFAULT_DATASET
    limit: int | None = None
    context: int = 512
    device: str = "auto"
    dtype: str | None = None
    out: Path | None = None
    seed: int = 0
    batch_size: int = 8
    store: StoreSettings = StoreSettings()
    threads: int | None = None
    loglik: bool = True
    generation: GenerationOptions | None = GenerationOptions()
    cost: bool = True
    cost_settings: dict[str, object] = Field(default_factory=dict)
    floors: bool = True
    cost_rounds: int = 2
    thresholds: Thresholds = Thresholds()
    prefer: Preference = "memory"
    fit_gb: float | None = None
    gate_variant: str | None = None
    """`--fail-on LEVEL:VARIANT`: the variant whose own verdict gates the release (checked to be in the run)."""
    force: bool = False
    trust_remote_code: bool = False
    allow_offload: bool = False
    allow_pickle: bool = False
    quiet: bool = False


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _validate(options: RunOptions) -> None:
    """Checks over the whole run; each option's own type and range are checked once, in `quantcheck.config`."""
    if not options.quants:
        raise QuantcheckError("name at least one variant with --quant (see `quantcheck quants`)")
    if not (options.loglik or options.generation or options.cost):
        raise QuantcheckError("--skip-quality and --skip-cost together leave nothing to measure")


def run(options: RunOptions) -> tuple[Path, Results]:
    """Run (or resume) an experiment and return its folder and results."""
    with ExitStack() as held, Launcher(fork=options.loglik or options.generation is not None) as launcher:
        return _experiment(options, launcher, held)  # the launcher starts no fork server for a cost-only run


@dataclass
class Prepared:
    """A run checked and resolved before any model loads: everything `plan` and the run itself start from."""

    options: RunOptions
    model: ResolvedModel
    models: list[ModelSpec]
    task: Task
    corpus_job: CorpusJob | None
    dataset: Data
    device: str
    dtype: str
    floors: list[ModelSpec]
    threads: int
    cost_settings: dict[str, object] | None
    unmeasured_cost: bool
    own_answers: bool
    """A prompts run whose variants also answer every prompt themselves (unless --skip-generation)."""


def prepare_run(options: RunOptions) -> Prepared:
    """Every check that can fail on the user's input, and what the run will load, without loading any model."""
    from quantcheck.backends.variants import check_specs, floor_specs, reference_spec, variant_spec
    from quantcheck.models.loading import DTYPES, default_dtype, pick_device, resolve_model

    _validate(options)
    model = resolve_model(options.model, options.allow_pickle)
    checkpoint = lambda source: str(resolve_model(source, options.allow_pickle).path)  # noqa: E731
    unmeasured_cost = options.reference_kld is not None and options.cost
    if options.reference_kld is not None:  # a recorded reference has no memory or speed to compare with
        options = _recorded_text(options).model_copy(update={"cost": False})
    models = [reference_spec(options.backend, str(model.path), options.reference_url, options.reference_kld)]
    models += [variant_spec(text, str(model.path), checkpoint, options.calibration) for text in options.quants]
    task = task_for(options.dataset)
    own_answers = task.own_answers and options.generation is not None
    variants = [spec.name for spec in models[1:]]
    if options.gate_variant is not None and options.gate_variant not in variants:
        raise QuantcheckError(
            f"--fail-on names {options.gate_variant!r}, which is not a variant of this run: "
            f"name one of {', '.join(variants) or 'the --quant variants'}"
        )
    request = _data_request(options)
    corpus_job = task.corpus_job(request)
    if task.every_token:  # no questions, so no generation phase: for prompts the options say how the reference answers
        options = options.model_copy(update={"generation": None})
    corpus = task.every_token
    task.check_models(corpus_job, model, models, options.engine)
    dataset = task.load(request, model.path)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise QuantcheckError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    # Input that needs no torch is checked above, in about a second; the device needs torch (seconds to import).
    device = pick_device(options.device)
    dtype = options.dtype or default_dtype(device)
    check_specs(models, device, options.engine)
    if (
        (served := models[0].endpoint) is not None
        and served.rows_top(corpus) is not None
        and options.store.kind == "compact"
    ):
        raise QuantcheckError(refuse_top_k_reference(served.rows_top(corpus), every_token=corpus))
    sampled = options.generation is not None and not (options.generation.greedy or options.generation.temperature == 0)
    floors = floor_specs(models[0], sampled) if options.floors and task.sampling_floor else []
    threads = options.threads or _default_threads()
    sweep = options.cost_settings
    if options.allow_offload:  # --max-memory-gb is then the device's share of the model (accelerate keeps to it)
        sweep = {key: value for key, value in sweep.items() if key != "max_memory_bytes"}
    cost_settings = _cost_settings(device, sweep, threads) if options.cost else None
    if options.generation is not None and options.generation.chat == "on":
        _require_chat_template(model.path, options.trust_remote_code)
    return Prepared(
        options,
        model,
        models,
        task,
        corpus_job,
        dataset,
        device,
        dtype,
        floors,
        threads,
        cost_settings,
        unmeasured_cost,
        own_answers,
    )


PLAN_TOLERANCE = 0.10
"""How far a plan may be off the measured weights (tests/test_plan.py holds it): a variant is refused before loading
only when even its plan less this much exceeds the budget."""


def plan(prepared: Prepared) -> RunPlan:
    """The weight memory of every model and the reference store's size, planned from config.json alone: estimates."""
    from quantcheck.backends import get_backend
    from quantcheck.storage.store import open_reference_store

    config = read_config(prepared.model.path)
    shape = ModelShape.from_config(config) if config else None
    dtype_bytes = DTYPE_BYTES[prepared.dtype]
    weights = {
        spec.name: get_backend(spec.backend).plan_weights(spec, shape, dtype_bytes)
        if shape
        else WeightPlan(bytes=None, basis="the model folder has no config.json to plan from")
        for spec in prepared.models
    }
    store, store_basis = None, "a text or prompts run: its rows are known once the text is tokenized"
    rows = prepared.task.planned_rows(prepared.dataset)
    if rows is not None and shape is not None:
        store = open_reference_store(Path("."), prepared.options.store).bytes_per_row(shape.vocab) * rows
        store_basis = (
            f"{rows} {prepared.task.unit}, {prepared.options.store.kind} store, the config's {shape.vocab} tokens"
        )
    return RunPlan(
        weights=weights, store_bytes=store, store_basis=store_basis, device=prepared.device, dtype=prepared.dtype
    )


def refuse_over_budget(prepared: Prepared, run_plan: RunPlan, free_bytes: int | None) -> None:
    """Refuse, before any load, a model whose planned weights exceed the device's free memory, or a variant whose
    planned weights exceed --fit-gb (the budget is the variants': the reference is what they are judged against)."""
    fit_gb = prepared.options.fit_gb
    roles = {spec.name: spec.role for spec in prepared.models}
    # accelerate offloads what a transformers model's device cannot hold; the other engines need it all on the device
    offloads = {spec.name for spec in prepared.models if spec.backend == "hf" and prepared.options.allow_offload}
    for name, planned in run_plan.weights.items():
        if planned.bytes is None:
            continue
        floor = planned.bytes * (1 - PLAN_TOLERANCE)
        if fit_gb is not None and roles[name] == "variant" and floor > fit_gb * GIB:
            raise QuantcheckError(
                f"{name}'s weights are planned at {fmt.nbytes(planned.bytes)} (estimate, {planned.basis}), above "
                f"--fit-gb {fit_gb:g}: leave it out, or raise --fit-gb"
            )
        if free_bytes is not None and floor > free_bytes and name not in offloads:
            raise QuantcheckError(
                f"{name}'s weights are planned at {fmt.nbytes(planned.bytes)} (estimate), more than the "
                f"{fmt.nbytes(free_bytes)} free on {run_plan.device}: free memory, or use a smaller variant"
            )


def plan_lines(run_plan: RunPlan) -> list[str]:
    """The plan as the first lines of a run (and all of `quantcheck plan`), each number named an estimate."""
    lines = [f"plan (estimates from config.json, before loading; {run_plan.dtype} on {run_plan.device}):"]
    for name, planned in run_plan.weights.items():
        size = fmt.nbytes(planned.bytes) if planned.bytes is not None else "not planned"
        lines.append(f"  {name}: weights {size} ({planned.basis})")
    store = fmt.nbytes(run_plan.store_bytes) if run_plan.store_bytes is not None else "not planned"
    lines.append(f"  reference store on disk: {store} ({run_plan.store_basis})")
    return lines


def _experiment(options: RunOptions, launcher: Launcher, held: ExitStack) -> tuple[Path, Results]:
    """The run; `held` keeps the run folder's lock until the run ends."""
    from quantcheck.backends.variants import describe
    from quantcheck.orchestration.environment import describe_environment, free_memory

    prepared = prepare_run(options)
    options, model, models, corpus_job, dataset = (
        prepared.options,
        prepared.model,
        prepared.models,
        prepared.corpus_job,
        prepared.dataset,
    )
    device, dtype, floors, threads, cost_settings = (
        prepared.device,
        prepared.dtype,
        prepared.floors,
        prepared.threads,
        prepared.cost_settings,
    )
    unmeasured_cost, task = prepared.unmeasured_cost, prepared.task
    corpus = task.every_token
    run_plan = plan(prepared)
    refuse_over_budget(prepared, run_plan, free_memory(device))
    # Imported once the input is known good (scipy takes seconds), while the fork server still imports torch.
    from quantcheck.analysis.summarize import early_findings, summarize

    out = options.out or default_out_dir()
    folder = RunFolder(out)
    identity = {
        "model": model.name,
        "model_revision": model.revision or "",
        "dataset": dataset.spec,
        "dataset_hash": dataset.content_hash(),
    }
    folder.refuse_foreign(options.force)  # before the lock, which would leave its file in someone else's folder
    lock = held.enter_context(RunLock(folder.lock_file))  # before prepare, which may clear the folder
    resumed = folder.prepare(identity, options.force)
    view = ProgressView(options.quiet)
    if lock.took_over:
        view.line(f"[yellow]{escape(lock.took_over)}[/yellow]")
    for line in plan_lines(run_plan):
        view.line(escape(line))
    warnings: list[RunWarning] = []
    if model.source == "builtin":
        warnings.append(RunWarning(code="builtin-model", message=model.notes[0]))
    warnings += _calibrated_on_evaluation(models, task.evaluated_text(dataset))
    if unmeasured_cost:
        warnings.append(
            RunWarning(
                code="no-cost",
                message="cost was not measured: the reference is a llama-perplexity base file, "
                "so there is no memory or speed to compare the variants with",
            )
        )
    # Everything that changes the stored numbers: a change recomputes them (and says why) instead of mixing.
    # The scoring version too: one that scores differently (6: windows cut as llama.cpp cuts them, a base file
    # decoded as llama.cpp decodes it, a seed per model and item) recomputes what an older one stored.
    reference_key = {
        **identity,
        "dtype": dtype,
        "device": device,
        "prompt_format": LOGLIK_FORMAT,
        "tool_version": QUANTCHECK_VERSION,
        "results_schema": SCORES_VERSION,
        "reference_backend": options.backend,
        "batch_size": options.batch_size,
        "reference_store": options.store.key(),
    }
    if models[0].endpoint is not None:
        # prompt_logprobs shapes a text run's rows only: other runs keep the keys they had before it existed
        unused = {"stated_weight_bytes"} | (set() if corpus else {"prompt_logprobs"})
        reference_key["reference_endpoint"] = models[0].endpoint.model_dump(exclude=unused)
    reference_key |= task.reference_key(corpus_job)
    if reason := folder.check_reference_key(reference_key):
        view.line(f"[yellow]{escape(reason)}[/yellow]")
    if (rows := task.stored_rows(folder, dataset)) is not None:
        folder.reference_store().check(rows)
    generation_key = (
        options.generation.model_dump() | {"results_schema": SCORES_VERSION} if options.generation else None
    )
    if generation_key and (reason := folder.check_generation_key(generation_key)):
        view.line(f"[yellow]{escape(reason)}[/yellow]")
    task.record(folder, dataset)
    if resumed:
        view.line(f"resuming {out}: finished items and phases are kept")
    _make_checkpoints(models, folder, view, MakeSettings(threads=threads, trust_remote_code=options.trust_remote_code))

    base = dict(
        run_dir=str(out),
        device=device,
        dtype=dtype,
        threads=threads,
        seed=options.seed,
        engine=options.engine,
        batch_size=options.batch_size,
        trust_remote_code=options.trust_remote_code,
        allow_offload=options.allow_offload,
        device_memory_bytes=options.cost_settings.get("max_memory_bytes") if options.allow_offload else None,
        allow_pickle=options.allow_pickle,
    )

    def summary(cost_pending: bool = False) -> Results:
        """results.json and items.jsonl from what the folder holds now."""
        recorded = {"device": device, "dtype": dtype, "threads": threads, "out": str(out)}
        return summarize(
            out,
            config=options.model_dump(mode="json") | recorded,
            model=model.info(dtype, device),
            dataset=task.dataset_info(dataset, folder, corpus_job),
            environment=describe_environment(device, threads),
            models=models,
            descriptions={spec.name: describe(spec) for spec in models},
            floors=floors,
            cost_rounds=options.cost_rounds if options.cost else 0,
            thresholds=options.thresholds,
            prefer=options.prefer,
            fit_gb=options.fit_gb,
            seed=options.seed,
            extra_warnings=warnings,
            expected={
                "loglik": options.loglik and not corpus,
                "generation": options.generation is not None,
                "cost": options.cost,
                "corpus": options.loglik and corpus,
                "answers": options.loglik and prepared.own_answers,
            },
            cost_pending=cost_pending,
            planned=run_plan.weights,
        )

    request = QualityRequest(
        loglik=options.loglik,
        generation=options.generation,
        floors=options.floors,
        items=task.planned_rows(dataset) or 0,
        corpus=corpus_job,
        own_answers=prepared.own_answers,
        shared=base,
    )
    failed_reference = None
    with view:
        if options.loglik or options.generation:  # an every-token kind has no generation phase: loglik alone asks
            for spec in [models[0], *floors, *models[1:]]:
                job = task.quality_job(spec, folder, request)
                if job is None:
                    view.skipped(f"{spec.name} {task.job_label}", "already finished")
                    continue
                outcome = _run(launcher, job, view, out, folder)
                if not outcome.ok and spec.is_reference:
                    failed_reference = outcome.message
                    break
        cost_todo = not all(
            folder.cost_file(spec.folder, cost_round).exists()
            for cost_round in range(1, options.cost_rounds + 1)
            for spec in models
        )
        if options.cost and not failed_reference and cost_todo and (options.loglik or options.generation):
            for line in early_findings(summary(cost_pending=True)):  # the quality findings before minutes of cost
                view.line(escape(line))
        if options.cost and not failed_reference:
            # Rounds repeat the same order (ABAB), so every other model runs between a model's two rounds: load that
            # spans both of them slows another model's round too, and the drift check sees it. ABBA put a variant's
            # two rounds side by side, where one slowdown could hit both and neither of the reference's.
            for cost_round in range(1, options.cost_rounds + 1):
                for spec in models:
                    if folder.cost_file(spec.folder, cost_round).exists():
                        view.skipped(f"{spec.name} cost round {cost_round}", "already measured")
                        continue
                    _run(
                        launcher,
                        JobSpec(
                            kind="cost",
                            task=task.name,
                            model=spec,
                            loglik=False,
                            cost=cost_settings,
                            cost_round=cost_round,
                            **base,
                        ),
                        view,
                        out,
                        folder,
                    )

    results = summary()
    if failed_reference:
        raise QuantcheckError(
            f"the reference model failed: {failed_reference}; nothing can be compared (results so far are in {out})"
        )
    return out, results


def _data_request(options: RunOptions) -> DataRequest:
    """The options the run's task reads its data set and job settings from (DataRequest's fields are RunOptions')."""
    return DataRequest(**{field.name: getattr(options, field.name) for field in fields(DataRequest)})


def _calibrated_on_evaluation(models: list[ModelSpec], judged_on: str | None) -> list[RunWarning]:
    """A variant calibrated on the text it is then judged on (the same text, or one holding it): flattered."""
    from quantcheck.models import calibrated

    if judged_on is None:
        return []
    flattered = []
    for spec in models:
        make = spec.make
        if make is not None and make.calibration != "default" and calibrated.uses_calibration(make.recipe):
            text = calibrated.calibration_text(make.calibration)
            if judged_on.strip() in text or text.strip() in judged_on:
                flattered.append(
                    RunWarning(
                        code="calibrated-on-evaluation",
                        model=spec.name,
                        message=f"{spec.name} was calibrated on {make.calibration}, which holds the text it is "
                        "judged on: calibrating on the test set flatters it; calibrate on other text",
                    )
                )
    return flattered


def _make_checkpoints(models: list[ModelSpec], folder: RunFolder, view: ProgressView, making: MakeSettings) -> None:
    """Before any scoring: each checkpoint the run makes (llmc:RECIPE, gguf:TYPE?imatrix=...) made by its backend or
    found in the cache, its making kept in the run. A resumed variant whose checkpoint is now another one (an edited
    calibration file: the checkpoint's name holds the text's hash; or other calibration settings) is measured afresh,
    never half on each. The name is compared, not the path: a moved cache or a new engine version is the same
    checkpoint."""
    from quantcheck.backends import get_backend

    for spec in models:
        if spec.make is None:
            continue
        made_file = folder.model_file(spec.folder, "made.json")
        recorded = json.loads(made_file.read_text()) if made_file.exists() else None
        if recorded is not None and (changed := _changed_checkpoint(recorded, spec)):
            folder.drop_model(spec.folder)
            view.line(f"[yellow]{escape(f'{spec.name}: {changed}: measuring it again on the new one')}[/yellow]")
        elif recorded is not None and Path(spec.weights).exists():
            continue
        view.line(f"{escape(spec.name)}: making it (once; kept in {Path(spec.weights).parent})")
        made, cached = get_backend(spec.backend).make_checkpoint(
            spec, folder.model_file(spec.folder, "make.log"), making
        )
        made |= {"cached": cached, "weights": spec.weights}
        write_json_atomic(made_file, made | spec.make.model_dump())
        took = "found in the cache" if cached else f"made in {fmt.seconds(made['seconds'])}"
        view.line(f"{escape(spec.name)}: {took} ({spec.weights})")


def _changed_checkpoint(recorded: dict, spec: ModelSpec) -> str | None:
    """Why the checkpoint a run folder's variant was scored on is not the one it would be made from now, or None."""
    asked = spec.make.model_dump().items()
    settings = [f"{key} {recorded[key]!r} -> {value!r}" for key, value in asked if recorded.get(key, value) != value]
    if settings:
        return f"its checkpoint is made differently now ({', '.join(settings)})"
    before, now = Path(recorded.get("weights", spec.weights)).name, Path(spec.weights).name
    if before != now:
        return f"its checkpoint is another one now ({spec.make.calibration} reads differently: {before} -> {now})"
    return None


def _recorded_text(options: RunOptions) -> RunOptions:
    """A llama-perplexity base file brings the text's windows and its context length: no other data set."""
    from quantcheck.backends.kldfile import read_kld_base

    if options.dataset != DEFAULT_DATASET:
        raise QuantcheckError("--reference-kld brings its own text (the base file's windows): leave --dataset out")
    base = read_kld_base(Path(options.reference_kld).expanduser())
    return options.model_copy(update={"dataset": KLD_PREFIX + str(base.path.resolve()), "context": base.n_ctx})


def _cost_settings(device: str, overrides: dict[str, object], threads: int) -> dict[str, object]:
    """The device defaults with the user's overrides; `--iterations N` caps the minimum too."""
    from quantcheck.cost.scenario import CostSettings

    merged = {**CostSettings.for_device(device).model_dump(), **overrides, "threads": threads}
    merged["min_iterations"] = min(merged["min_iterations"], merged["max_iterations"])
    try:
        return CostSettings(**merged).model_dump()
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "cost settings"
        raise QuantcheckError(f"{where}: {problem['msg']}") from None


def _require_chat_template(path: Path, trust_remote_code: bool) -> None:
    """Checked before any model loads: forcing chat prompts on a model without a template is an input error."""
    from quantcheck.models.loading import load_tokenizer

    if not getattr(load_tokenizer(str(path), trust_remote_code), "chat_template", None):
        raise QuantcheckError(
            f"--chat on was asked for but {path.name} has no chat template: use --chat auto (plain prompts) or off"
        )


def _default_threads() -> int:
    from quantcheck.cost.scenario import default_threads

    return default_threads()


def _run(launcher: Launcher, spec: JobSpec, view: ProgressView, out: Path, folder: RunFolder):
    outcome = launcher.run(spec, folder, view)
    if outcome.interrupted:
        raise Interrupted(f"interrupted: finished work is saved in {out}; run the same command again to resume")
    if not outcome.ok:
        view.failed(f"{spec.model.name} ({spec.kind})", outcome.message or "failed")
    return outcome
