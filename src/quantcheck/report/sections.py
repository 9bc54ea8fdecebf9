"""Report sections shared by HTML and Markdown: what is missing, warnings, environment."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from quantcheck.analysis import format as fmt
from quantcheck.report.data import DATASET_FILE, ITEMS_FILE, RunData
from quantcheck.report.table import corpus_wording
from quantcheck.schema.results import SCHEMA_VERSION, GenerationSettings, Results


@dataclass
class MissingNote:
    text: str
    details: list[str] = field(default_factory=list)


def _value_text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value)
    if value is None:
        return fmt.NA
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (str, int, bool)):
        return str(value)
    return json.dumps(value, default=str)


def missing_notes(data: RunData, skipped_figures: dict[str, str] | None = None) -> list[MissingNote]:
    """Everything a reader should know is absent or incomplete, in plain words."""
    r = data.results
    notes: list[MissingNote] = []
    if r.schema_version != SCHEMA_VERSION:
        notes.append(
            MissingNote(
                f"results.json has schema version {r.schema_version}; this report reads version "
                f"{SCHEMA_VERSION}, so some sections may be absent."
            )
        )
    if not r.finished:
        notes.append(
            MissingNote("The run is not finished (results.json says finished: false); numbers may still change.")
        )
    for section in r.missing:
        notes.append(MissingNote(f"Section not computed: {section}"))
    if not r.models:
        notes.append(MissingNote("No model results in results.json."))
    for m in r.models:
        if m.status == "failed":
            notes.append(MissingNote(f"Model {m.name} failed.", list(m.errors) or ["(no error message recorded)"]))
        elif m.status in ("pending", "partial"):
            notes.append(
                MissingNote(f"Model {m.name} is {m.status}: some of its measurements are absent.", list(m.errors))
            )
        elif m.errors:
            notes.append(MissingNote(f"Model {m.name} reported errors.", list(m.errors)))
    if r.model is None:
        notes.append(MissingNote("No model information (results.json has no 'model' section)."))
    if r.dataset is None:
        notes.append(MissingNote("No dataset information (results.json has no 'dataset' section)."))
    if not data.is_text:  # a text corpus has no items or questions: its per-window records are the figure's to miss
        if not data.has_items_file:
            notes.append(MissingNote(f"{ITEMS_FILE} is missing: no per-item answers, flips or KL distribution."))
        elif not data.items:
            notes.append(MissingNote(f"{ITEMS_FILE} holds no readable item records."))
        if not data.has_dataset_file:
            notes.append(MissingNote(f"{DATASET_FILE} is missing: questions and choices are not shown."))
    for problem in data.problems:
        notes.append(MissingNote(problem))
    for title, reason in (skipped_figures or {}).items():
        notes.append(MissingNote(f"Figure not drawn \u2014 {title}: {reason}."))
    return notes


def warning_rows(results: Results) -> list[tuple[str, str, str]]:
    """(code, model, message) for every run warning."""
    return [(w.code, w.model or "all models", w.message) for w in results.warnings]


def generation_settings(results: Results) -> GenerationSettings | None:
    for m in results.models:
        if m.generative is not None:
            return m.generative.settings
    return None


def environment_rows(data: RunData) -> list[tuple[str, str]]:
    """(label, value) pairs: device, dtypes, versions, threads, dataset, prompt format, seed."""
    r = data.results
    rows: list[tuple[str, str]] = []
    if r.model is not None:
        mi = r.model
        where = f"{mi.path} ({mi.source})" + (f" @ {mi.revision}" if mi.revision else "")
        rows.append(("Model", f"{mi.name} \u2014 {where}"))
        rows.append(("Device", mi.device))
        rows.append(("Reference dtype", mi.reference_dtype))
        for note in mi.notes:
            rows.append(("Model note", note))
    compute = [(m.name, m.precision) for m in r.models if m.precision is not None]
    if compute:
        rows.append(("Compute dtype", "; ".join(f"{n}: {p.compute_dtype}" for n, p in compute)))
        rows.append(
            (
                "Parameter dtypes",
                "; ".join(
                    f"{n}: " + ", ".join(f"{dt} {fmt.integer(cnt)}" for dt, cnt in p.parameter_dtypes.items())
                    for n, p in compute
                ),
            )
        )
        devices = sorted({d for _, p in compute for d in p.devices})
        rows.append(("Model devices", ", ".join(devices) or fmt.NA))
        offloaded = [n for n, p in compute if p.offloaded]
        rows.append(("Offloaded", ", ".join(offloaded) if offloaded else "no model offloaded"))
    costs = [(m.name, m.cost) for m in r.models if m.cost is not None]
    if costs:
        threads = sorted({c.threads for _, c in costs})
        rows.append(
            (
                "Threads",
                ", ".join(str(t) for t in threads)
                if len(threads) == 1
                else "; ".join(f"{n}: {c.threads}" for n, c in costs),
            )
        )
        methods = sorted({c.memory_method for _, c in costs})
        rows.append(("Memory measured with", ", ".join(methods)))
    for key, value in r.environment.items():
        rows.append((str(key), _value_text(value)))
    if r.dataset is not None and data.is_text:  # a text's windows or users' prompts: no subjects, no answer letters
        ds = r.dataset
        wording = corpus_wording(r)
        rows.append(("Dataset", f"{ds.spec} \u2014 {wording.size} from {ds.source}"))
        rows.append(("Dataset hash", ds.content_hash))
        rows.append((wording.units.capitalize(), ds.prompt_format))
    elif r.dataset is not None:
        ds = r.dataset
        subjects = ", ".join(ds.subjects[:8]) + (f" and {len(ds.subjects) - 8} more" if len(ds.subjects) > 8 else "")
        rows.append(("Dataset", f"{ds.spec} \u2014 {fmt.integer(ds.n_items)} items from {ds.source}"))
        rows.append(("Subjects", subjects or fmt.NA))
        rows.append(("Dataset hash", ds.content_hash))
        rows.append(("Prompt format", ds.prompt_format))
        rows.append(("Answer continuations", " ".join(repr(c) for c in ds.answer_continuations)))
    gs = generation_settings(r)
    if gs is not None:
        rows.append(
            (
                "Generation settings",
                f"{gs.prompt_style} prompts, {'greedy' if gs.greedy else f'temperature {gs.temperature:g}'}, "
                f"max {gs.max_new_tokens} new tokens",
            )
        )
        rows.append(("Generation instruction", gs.instruction))
    seed = r.config.get("seed", gs.seed if gs is not None else None)
    rows.append(("Seed", _value_text(seed)))
    rows.append(("quantcheck", f"{r.tool_version} (results schema {r.schema_version}), run created {r.created_at}"))
    return rows


def config_rows(results: Results) -> list[tuple[str, str]]:
    return [(str(k), _value_text(v)) for k, v in results.config.items()]


def run_title(results: Results) -> str:
    if results.model is not None:
        return f"quantcheck report: {results.model.name}"
    return "quantcheck report"
