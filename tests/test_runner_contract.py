"""`orchestration/runner` in-process: what it refuses before any model loads, what it plans, in which order it runs the
jobs, what it writes before the cost phase, and what a resumed run launches again. A defect here shows only as a
wrong number (or a recomputed one) far away: in results.json, or as minutes spent again."""

from __future__ import annotations

import dataclasses
import json
import shutil
from contextlib import ExitStack

import pytest

from quantcheck.data.load import load_dataset
from quantcheck.errors import QuantcheckError
from quantcheck.models.builtin import builtin_model_dir
from quantcheck.orchestration import runner
from quantcheck.orchestration.launcher import Launcher
from quantcheck.schema.jobs import JobSpec
from quantcheck.schema.models import GenerationOptions, MakeSpec, ModelSpec
from quantcheck.schema.results import GIB, RunPlan, WeightPlan
from quantcheck.storage.store import StoreSettings

GiB = 1024**3
SAMPLING_SEED_OFFSET = 1_000_003  # the sampling floor re-runs the reference with only its seed changed
TINY_COST = {
    "batch_sizes": [1],
    "seq_len": 8,
    "warmup": 0,
    "max_iterations": 1,
    "time_budget_s": 0.2,
    "generation_prompts": 1,
    "generation_new_tokens": 16,  # 2 tokens were not measurably slower than 1 beside a busy test (CI)
}


def options(**fields) -> runner.RunOptions:
    defaults = {
        "quants": ["none"],
        "dataset": "mmlu:virology",
        "limit": 3,
        "batch_size": 2,
        "threads": 2,
        "generation": GenerationOptions(max_new_tokens=2, batch_size=3),  # temperature 0.1: sampled, so a floor
        "cost_rounds": 1,
        "cost_settings": TINY_COST,
        "quiet": True,
    }
    return runner.RunOptions(**{**defaults, **fields})


def one_line_error(call, *args) -> str:
    with pytest.raises(QuantcheckError) as caught:
        call(*args)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


# ------------------------------------------------------------------------------------ before any model loads


def test_validate_refuses_a_run_without_a_variant_or_without_anything_to_measure():
    """No --quant, or every phase skipped, is refused in one line."""
    assert "--quant" in one_line_error(runner._validate, options(quants=[]))
    nothing = options(loglik=False, generation=None, cost=False)
    assert "nothing to measure" in one_line_error(runner._validate, nothing)
    runner._validate(options(loglik=False, generation=None))  # cost alone is something to measure


def test_prepare_run_checks_the_run_before_resolving_the_model():
    """A run without a variant is refused before the model is even looked for (a missing folder is not the error)."""
    message = one_line_error(runner.prepare_run, options(quants=[], model="/no/such/model-folder"))
    assert "--quant" in message


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"gate_variant": "bnb-nf4"}, "--fail-on names 'bnb-nf4', which is not a variant of this run"),
        ({"dtype": "float8"}, "--dtype must be one of float32, bfloat16, float16"),
        ({"backend": "no-such-engine"}, "--backend must be one of"),
        ({"quants": ["no-such-method"]}, "no-such-method"),
        ({"dataset": "mmlu:no_such_subject"}, "no_such_subject"),
        ({"cost_settings": {"seq_len": 0}}, "seq_len"),
    ],
)
def test_prepare_run_refuses_bad_input_in_one_line(fields, says):
    """Each input the user can get wrong is a one-line QuantcheckError from prepare_run, which loads no model."""
    assert says in one_line_error(runner.prepare_run, options(**fields))


@pytest.fixture(scope="module")
def prepared() -> runner.Prepared:
    return runner.prepare_run(options())


def test_prepare_run_resolves_models_floors_data_and_settings(prepared):
    """The reference first, then the variants; a sampling floor only for sampled answers; the seeded sample of data."""
    assert [(spec.name, spec.role) for spec in prepared.models] == [("reference", "reference"), ("none", "variant")]
    assert prepared.models[0].weights == str(builtin_model_dir())
    assert [(spec.name, spec.role, spec.floor) for spec in prepared.floors] == [
        ("reference (sampled again)", "floor", "sampling")
    ]
    assert prepared.dataset.items == load_dataset("mmlu:virology", 3, 0).items
    assert (prepared.device, prepared.dtype, prepared.threads, prepared.corpus_job) == ("cpu", "float32", 2, None)
    cost = prepared.cost_settings
    assert cost["threads"] == 2 and cost["batch_sizes"] == (1,) and cost["seq_len"] == 8
    assert cost["min_iterations"] == 1  # capped at --iterations, below the device default of 3
    greedy = runner.prepare_run(options(generation=GenerationOptions(greedy=True), cost=False, seed=5))
    assert greedy.floors == [] and greedy.cost_settings is None
    assert greedy.dataset.items == load_dataset("mmlu:virology", 3, 5).items
    assert runner.prepare_run(options(floors=False, cost=False)).floors == []


def test_plan_sizes_the_reference_store_as_rows_times_its_row(prepared):
    """The planned store is questions x one row: vocabulary x float32 (full), 8 bytes per kept entry + 8 (compact)."""
    vocab = json.loads((builtin_model_dir() / "config.json").read_text())["vocab_size"]
    full = runner.plan(
        dataclasses.replace(prepared, options=prepared.options.model_copy(update={"store": StoreSettings(kind="full")}))
    )
    assert full.store_bytes == 3 * vocab * 4
    compact = StoreSettings(kind="compact", top_k=32, tail_samples=16)
    planned = runner.plan(dataclasses.replace(prepared, options=prepared.options.model_copy(update={"store": compact})))
    assert planned.store_bytes == 3 * ((32 + 16) * 8 + 8)
    assert set(planned.weights) == {"reference", "none"} and (planned.device, planned.dtype) == ("cpu", "float32")
    assert planned.weights["reference"].bytes == planned.weights["none"].bytes  # `none` is the reference's weights


def budget_plan(reference_gib: float, variant_gib: float | None) -> RunPlan:
    return RunPlan(
        weights={
            "reference": WeightPlan(bytes=int(reference_gib * GiB), basis="planned"),
            "none": WeightPlan(bytes=None if variant_gib is None else int(variant_gib * GiB), basis="planned"),
        },
        store_bytes=None,
        store_basis="",
        device="cpu",
        dtype="float32",
    )


def with_fit(prepared: runner.Prepared, fit_gb: float | None) -> runner.Prepared:
    return dataclasses.replace(prepared, options=prepared.options.model_copy(update={"fit_gb": fit_gb}))


def test_refuse_over_budget_holds_variants_to_fit_gb_and_every_model_to_free_memory(prepared):
    """--fit-gb binds variants only; free memory binds every model; both allow the plan's 10% error."""
    assert GIB == GiB
    plan = budget_plan(reference_gib=10, variant_gib=2)
    message = one_line_error(runner.refuse_over_budget, with_fit(prepared, 1.0), plan, None)
    assert message.startswith("none's weights are planned at") and "--fit-gb 1" in message
    runner.refuse_over_budget(with_fit(prepared, 1.9), plan, None)  # 2 GiB less 10% fits in 1.9
    runner.refuse_over_budget(with_fit(prepared, 2.5), plan, None)  # the 10 GiB reference is not held to it
    message = one_line_error(runner.refuse_over_budget, with_fit(prepared, None), plan, 5 * GiB)
    assert message.startswith("reference's weights are planned at") and "free on cpu" in message
    runner.refuse_over_budget(with_fit(prepared, None), plan, int(9.5 * GiB))  # 10 GiB less 10% fits
    runner.refuse_over_budget(with_fit(prepared, 0.1), budget_plan(0.5, None), GiB)  # unplanned: nothing to hold


def test_plan_lines_name_every_number_an_estimate_and_what_is_not_planned():
    """The plan's first line says its numbers are estimates; a model or store without a plan says so."""
    plan = RunPlan(
        weights={
            "reference": WeightPlan(bytes=3 * GiB, basis="config.json"),
            "none": WeightPlan(bytes=None, basis="why"),
        },
        store_bytes=None,
        store_basis="a text run",
        device="cpu",
        dtype="float32",
    )
    lines = runner.plan_lines(plan)
    assert lines[0] == "plan (estimates from config.json, before loading; float32 on cpu):"
    assert lines[1].startswith("  reference: weights 3") and lines[1].endswith("(config.json)")
    assert lines[2:] == ["  none: weights not planned (why)", "  reference store on disk: not planned (a text run)"]


def made_variant(weights: str, **make) -> ModelSpec:
    settings = {"recipe": "w4a16", "calibration": "default", "samples": 32, "seq_len": 256, **make}
    return ModelSpec(
        name="llmc:w4a16", role="variant", backend="hf", method="none", weights=weights, make=MakeSpec(**settings)
    )


def test_changed_checkpoint_compares_the_making_settings_and_the_checkpoints_name_not_its_folder():
    """A made variant is measured again when its settings or checkpoint name changed, never for a moved cache."""
    spec = made_variant("/cache/new-place/w4a16-abc123")
    recorded = {**spec.make.model_dump(), "weights": "/cache/old-place/w4a16-abc123", "seconds": 9.0}
    assert runner._changed_checkpoint(recorded, spec) is None
    assert runner._changed_checkpoint({k: v for k, v in recorded.items() if k != "iters"}, spec) is None
    assert runner._changed_checkpoint(recorded | {"samples": 64}, spec) == (
        "its checkpoint is made differently now (samples 64 -> 32)"
    )
    assert runner._changed_checkpoint(recorded | {"weights": "/cache/old-place/w4a16-fff999"}, spec) == (
        "its checkpoint is another one now (default reads differently: w4a16-fff999 -> w4a16-abc123)"
    )


# ------------------------------------------------------------------------------------- a real run, in-process


class RecordingLauncher(Launcher):
    """The real launcher (real workers), noting each job and results.json as it stood when the first cost job began."""

    def __init__(self) -> None:
        super().__init__(fork=True)
        self.jobs: list[JobSpec] = []
        self.before_cost: dict | None = None

    def run(self, spec, folder, view):
        if spec.kind == "cost" and self.before_cost is None:
            self.before_cost = json.loads((folder.root / "results.json").read_text())
        self.jobs.append(spec)
        return super().run(spec, folder, view)


def run_recorded(run_options: runner.RunOptions):
    with ExitStack() as held, RecordingLauncher() as launcher:
        _, results = runner._experiment(run_options, launcher, held)
    return launcher, results


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The built-in model against `none`, 3 questions, every phase: one real run through the runner."""
    out = tmp_path_factory.mktemp("runner") / "run"
    launcher, results = run_recorded(options(out=out))
    return out, launcher, results


def test_models_run_reference_first_then_floors_then_variants_then_cost(finished_run):
    """Quality jobs: the reference (the variants replay its rows), its sampling floor, the variants; then cost."""
    _, launcher, _ = finished_run
    jobs = [(job.model.name, job.kind) for job in launcher.jobs]
    assert jobs == [
        ("reference", "quality"),
        ("reference (sampled again)", "quality"),
        ("none", "quality"),
        ("reference", "cost"),
        ("none", "cost"),
    ]
    reference, floor, variant = launcher.jobs[:3]
    assert (reference.loglik, reference.engine_floor, reference.generation is not None, reference.seed) == (
        True,
        True,
        True,
        0,
    )
    assert (floor.loglik, floor.engine_floor, floor.generation is not None) == (False, False, True)
    assert floor.seed == SAMPLING_SEED_OFFSET  # only its seed differs from the reference's
    assert (variant.loglik, variant.engine_floor, variant.generation is not None, variant.seed) == (True, True, True, 0)
    assert all(job.batch_size == 2 and job.threads == 2 and job.dtype == "float32" for job in launcher.jobs)


def test_results_written_before_cost_hold_quality_and_no_verdict(finished_run):
    """Between the phases results.json has every quality number, says cost is pending, and judges nothing yet."""
    _, launcher, results = finished_run
    early = launcher.before_cost
    assert early is not None and early["finished"] is False
    assert early["missing"] == ["reference: cost", "none: cost"]
    by_name = {model["name"]: model for model in early["models"]}
    assert by_name["none"]["verdict"] is None
    assert list(by_name["none"]["incomplete"]) == ["cost"]
    assert by_name["none"]["incomplete"]["cost"] == "cost is being measured now: the verdict waits for it"
    final = {model.name: model for model in results.models}
    assert by_name["none"]["paired_loglik"]["n"] == 3
    assert by_name["none"]["paired_loglik"] == final["none"].paired_loglik.model_dump(mode="json")
    assert by_name["none"]["agreement"]["kl"]["mean"]["value"] == final["none"].agreement.kl.mean.value
    assert results.finished and results.missing == [] and final["none"].verdict is not None


def test_resumed_run_launches_only_what_is_missing(finished_run, tmp_path):
    """A finished folder launches no job again; with one model's answers gone, only that model's generation runs."""
    out, _, first = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    launcher, again = run_recorded(options(out=copy))
    assert launcher.jobs == []
    assert again.models[1].paired_loglik == first.models[1].paired_loglik
    (copy / "models" / "none" / "generation.jsonl").unlink()
    launcher, _ = run_recorded(options(out=copy))
    assert [(job.model.name, job.kind) for job in launcher.jobs] == [("none", "quality")]
    job = launcher.jobs[0]
    assert (job.loglik, job.engine_floor, job.generation is not None) == (False, False, True)
    assert len((copy / "models" / "none" / "generation.jsonl").read_text().splitlines()) == 3
