"""The `quantcheck` command: `run`, `quants`, `report`, and lm-eval interop (`compare-lmeval`, `export-lmeval`).

Errors the user can fix print one line and exit 2 (130 for Ctrl-C); `--debug` shows the traceback.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantcheck.config import CLI_PATH, RunOption, run_options
from quantcheck.errors import QuantcheckError
from quantcheck.orchestration.sensitivity import SensitivityOptions

if TYPE_CHECKING:
    from quantcheck.config import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Should I serve the quantized version? Compare an LLM with its quantized variants.",
)
console = Console(stderr=True)


def _fail(error: QuantcheckError, debug: bool) -> None:
    if debug:
        raise error
    console.print(
        f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True
    )  # "[vllm]" is text, not markup
    raise typer.Exit(error.exit_code)


@app.command()
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file holding any of these options (RUN_DIR/config.toml runs a run again); "
            "options typed here override it"
        ),
    ] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
    **options: object,  # every key of a config file, as `_with_options` declares them from `RunConfig`
) -> None:
    """Compare MODEL with each --quant variant and write results.json, items.jsonl, config.toml and the report."""
    from quantcheck.analysis.recommend import gate_failure
    from quantcheck.api import run_config

    try:
        settings = _settings(ctx, config)
        if settings.trust_remote_code:
            console.print("[yellow]warning:[/yellow] trust_remote_code runs Python code from the model repository")
        comparison = run_config(settings)
        _print_summary(comparison.results, settings.quiet)
        if not settings.quiet:
            _print_files(comparison.run_dir)
    except QuantcheckError as error:
        _fail(error, debug)
    if settings.fail_on and (gate := gate_failure(comparison.results, settings.fail_on)):
        console.print(f"[red]--fail-on {settings.fail_on}:[/red] {escape(gate)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


LIST_KEYS = ("cost.batch_sizes",)
"""The list-valued keys `run` reads as comma-separated numbers (`_batch_sizes`); --quant is repeated instead."""


def _with_options(command: Callable[..., None], options: list[RunOption]) -> None:
    """Give `command` an option for each of `options` (`config.run_options` of a settings model), after its context
    and before its own options: each is declared once, with its type, default and help, in that model."""
    own = [
        param
        for param in inspect.signature(command, eval_str=True).parameters.values()
        if param.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    added = []
    for option in options:
        flags = ["--quant", "-q"] if option.name == "quant" else []  # the others: named after the key, as typer does
        if option.key == "model":
            info = typer.Argument(help=escape(option.field.description))
        else:
            info = typer.Option(*flags, help=escape(option.field.description))  # "[#MODEL]" is text
        annotation = Annotated[_cli_type(option), info]
        default = (
            None
            if option.key == "variants"
            else ...
            if option.field.is_required()
            else option.field.get_default(call_default_factory=True)
        )
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        added.append(inspect.Parameter(option.name, kind, default=default, annotation=annotation))
        command.__annotations__[option.name] = annotation
    command.__signature__ = inspect.Signature([own[0], *added, *own[1:]])


def _cli_type(option: RunOption) -> object:
    """What the command line reads a key as: a choice or a path as text (pydantic checks it once, in `config`), a list
    of batch sizes as comma-separated text, --quant repeated."""
    if option.key == "variants":
        return list[str] | None
    annotation, optional = option.field.annotation, False
    if get_origin(annotation) in (Union, UnionType):
        inner = [arm for arm in get_args(annotation) if arm is not type(None)]
        if len(inner) > 1:
            raise TypeError(f"{option.key}: no command-line type for {annotation}")
        annotation, optional = inner[0], len(inner) < len(get_args(annotation))
    marks = []
    while get_origin(annotation) is Annotated:
        annotation, *more = get_args(annotation)
        marks += more
    if get_origin(annotation) is list and option.key not in LIST_KEYS:
        raise TypeError(f"{option.key}: a list on the command line needs its own parsing (LIST_KEYS)")
    plain = Path if CLI_PATH in marks else annotation if annotation in (bool, int, float, Path) else str
    return plain | None if optional else plain


RUN_OPTIONS = run_options()
_with_options(run, RUN_OPTIONS)


def _plan(ctx: typer.Context, **params: object) -> None:
    """Plan a run without loading any model: each model's weight memory and the reference store's size, estimated
    from config.json; a model over --fit-gb or the free memory is refused (exit 2), as `run` would refuse it."""
    from quantcheck.orchestration.environment import free_memory
    from quantcheck.orchestration.runner import plan, plan_lines, prepare_run, refuse_over_budget

    try:
        settings = _settings(ctx, params["config"])
        prepared = prepare_run(settings.options())
        run_plan = plan(prepared)
        _stdout().print("\n".join(plan_lines(run_plan)), highlight=False, markup=False)
        refuse_over_budget(prepared, run_plan, free_memory(prepared.device))
    except QuantcheckError as error:
        _fail(error, bool(params["debug"]))


app.command("plan", help=_plan.__doc__)(functools.wraps(run)(_plan))  # the same options as `run`, read the same way


CONFIG_KEYS = {option.name: option.key for option in RUN_OPTIONS}
"""Each `run` option's key in a config file."""
NOT_IN_CONFIG = ("config", "debug")


def _settings(ctx: typer.Context, config_file: Path | None) -> RunConfig:
    """The config file, then each option the user typed over it: a default never overrides the file."""
    from quantcheck.config import key_path, parse_config, read_config

    settings = read_config(config_file).model_dump(exclude_unset=True) if config_file else {}
    typed: dict[str, str] = {}  # config key -> the option that set it, to name it in an error
    for name, value in ctx.params.items():
        if name in NOT_IN_CONFIG or not _typed(ctx, name):
            continue
        path = CONFIG_KEYS.get(name, name)
        *tables, key = path.split(".")
        table = settings
        for inner in tables:
            table = table.setdefault(inner, {})
        table[key] = _batch_sizes(value) if path in LIST_KEYS else value
        typed[path] = "MODEL" if name == "model" else "--" + name.replace("_", "-")

    def where(location: tuple[str | int, ...]) -> str:
        option = typed.get(key_path(tuple(part for part in location if isinstance(part, str))))
        return option or (f"{config_file}: " if config_file else "") + key_path(location)

    return parse_config(settings, where)


def _typed(ctx: typer.Context, name: str) -> bool:
    """The user typed this option (a default never overrides a config file)."""
    source = ctx.get_parameter_source(name)  # by name: typer may bring its own copy of click's enum
    return source is not None and source.name == "COMMANDLINE"


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise QuantcheckError(f"--batch-sizes must be comma-separated whole numbers, got {text!r}") from None


def _stdout() -> Console:
    """Logs and CI capture have no terminal width: give tables room rather than 80 columns."""
    console = Console()
    if not console.is_terminal:
        console.width = 160
    return console


def _print_summary(results, quiet: bool) -> None:
    """One row per model, then one line per variant: the verdict and its one-sentence reason."""
    if quiet:
        return
    from quantcheck.report.data import is_text_run

    table = _text_summary(results) if is_text_run(results) else _question_summary(results)
    console = _stdout()
    console.print(table)
    for result in results.models[1:]:
        if result.verdict:
            console.print(f"[bold]{result.name}[/bold]: {result.verdict.summary}", highlight=False)
    for warning in results.warnings:
        console.print(f"[yellow]warning[/yellow] {warning.message}", highlight=False)
    if results.recommendation:
        console.print(f"[bold]Recommendation:[/bold] {escape(results.recommendation.reason)}", highlight=False)


def _question_summary(results) -> Table:
    from quantcheck.analysis.format import memory_vs_ref, nats, percent, points_ci

    table = Table(title="quantcheck summary")
    for column in (
        "model",
        "acc (loglik)",
        "Δ acc (95% CI)",
        "acc (gen)",
        "mean KL",
        "top-1 agree",
        "weights vs ref",
        "verdict",
    ):
        table.add_column(column)
    for result in results.models:
        paired, agreement, cost = result.paired_loglik, result.agreement, result.cost_vs_reference
        table.add_row(
            result.name + ("" if result.status == "ok" else f" [{result.status}]"),
            percent(result.loglik.accuracy) if result.loglik else "-",
            points_ci(paired.difference, paired.difference_ci) if paired else "",
            percent(result.generative.accuracy.accuracy) if result.generative else "-",
            ("≥ " if agreement.kl.is_lower_bound else "") + nats(agreement.kl.mean.value) if agreement else "",
            percent(agreement.top1_agreement.value) if agreement else "",
            memory_vs_ref(cost.weight_memory_ratio, cost.memory_saving) if cost else "",
            result.verdict.decision if result.verdict else "",
        )
    return table


def _text_summary(results) -> Table:
    """A text or prompts run has no accuracy: perplexity and its ratio to the reference's stand in its place."""
    from quantcheck.analysis.format import memory_vs_ref, nats, number, number_ci, percent
    from quantcheck.report.table import corpus_wording

    table = Table(title=f"quantcheck summary: {corpus_wording(results).size}")
    for column in ("model", "PPL", "PPL ratio (95% CI)", "mean KL", "same top-1", "weights vs ref", "verdict"):
        table.add_column(column)
    for result in results.models:
        corpus, agreement, cost = result.corpus, result.agreement, result.cost_vs_reference
        ratio = corpus.perplexity_ratio if corpus else None
        table.add_row(
            result.name + ("" if result.status == "ok" else f" [{result.status}]"),
            number(corpus.perplexity.value, 3) if corpus else "-",
            number_ci(ratio.value, ratio.ci) if ratio else "",
            ("≥ " if agreement.kl.is_lower_bound else "") + nats(agreement.kl.mean.value) if agreement else "",
            percent(corpus.same_top1.value) if corpus and corpus.same_top1 else "",
            memory_vs_ref(cost.weight_memory_ratio, cost.memory_saving) if cost else "",
            result.verdict.decision if result.verdict else "",
        )
    return table


def _print_files(folder: Path, took: str = "") -> None:
    from quantcheck.report import HTML_FILE, MARKDOWN_FILE

    _stdout().print(
        f"report: {folder / HTML_FILE}{took}\nmarkdown: {folder / MARKDOWN_FILE}\nresults: {folder / 'results.json'}"
    )


@app.command()
def quants() -> None:
    """List every quantization method of every backend, what it does, and whether it can run here."""
    import importlib.util

    from quantcheck.backends import BACKEND_NAMES, get_backend, quant_prefix
    from quantcheck.errors import QuantcheckError

    cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    table = Table(title="quantization methods (--quant NAME; --backend ENGINE runs the reference there)")
    for column in ("--quant", "description", "devices", "runs here"):
        table.add_column(column)
    for backend_name in BACKEND_NAMES:
        backend = get_backend(backend_name)
        if backend.quant_syntax:
            table.add_row(escape(backend.quant_syntax), (backend.__doc__ or "").strip(), "the server's", "yes")
            continue
        try:
            backend.interpreter()
            engine_missing = None
        except QuantcheckError:
            engine_missing = backend.install_hint
        prefix = quant_prefix(backend_name)
        for method in backend.methods().values():
            missing = method.missing_requirements()
            devices_here = [device for device in sorted(method.devices) if device == "cpu" or cuda]
            if engine_missing:
                status = f"no: {engine_missing}"
            elif missing:
                status = f"no: pip install {method.install}"
            else:
                status = "yes (" + ", ".join(devices_here) + ")" if devices_here else "no: needs CUDA"
            table.add_row(
                escape(prefix + method.name),
                escape(method.description),
                ", ".join(sorted(method.devices)),
                escape(status),
            )
        syntax, description = backend.checkpoint_row()
        devices = sorted(set().union(*(method.devices for method in backend.methods().values())))
        status = "yes" if not engine_missing else f"no: {engine_missing}"
        table.add_row(escape(prefix + syntax), escape(description), ", ".join(devices), escape(status))
        if made := backend.made_row():
            table.add_row(escape(prefix + made[0]), escape(made[1]), ", ".join(devices), escape(status))
        if backend_name in ("hf", "vllm"):
            _llmc_rows(table, prefix, engine_missing)
    table.caption = escape(
        "every --quant is [backend:]method[?key=value&...]; options: "
        + "; ".join(
            f"{quant_prefix(name) or name + ':'} {', '.join(get_backend(name).variant_options)}"
            for name in BACKEND_NAMES
            if get_backend(name).variant_options
        )
    )
    Console().print(table)


def _llmc_rows(table: Table, prefix: str, engine_missing: str | None) -> None:
    """The llm-compressor recipes this engine reads once made (`models.calibrated`), whether they need calibration
    and whether they can be made and read here."""
    from quantcheck.errors import QuantcheckError
    from quantcheck.models.calibrated import PREFIX, RECIPES, maker_python
    from quantcheck.models.quant_methods import importable

    try:
        maker_python()
        status = None if prefix or importable("compressed_tensors") else "no: pip install 'quantcheck[llmc]'"
    except QuantcheckError as error:
        status = f"no: {str(error).split(': ', 1)[-1]}"
    for recipe in RECIPES.values():
        needs = "calibrated (calibration=text:FILE)" if recipe.calibrated else "no calibration"
        table.add_row(
            escape(f"{prefix}{PREFIX}:{recipe.name}"),
            escape(f"{recipe.description}; {needs}"),
            "cpu, cuda",
            escape(f"no: {engine_missing}" if engine_missing else status or "yes (made once, then read here)"),
        )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a quantcheck results folder")],
    debug: bool = False,
) -> None:
    """Re-render report.html, report.md and metrics.csv from a results folder (no model, no torch)."""
    from quantcheck.report import render_report
    from quantcheck.storage.folder import RunFolder
    from quantcheck.storage.lock import current_holder

    try:
        start = time.perf_counter()
        render_report(run_dir)
        if writer := current_holder(RunFolder(run_dir).lock_file):
            console.print(
                f"[yellow]note:[/yellow] {escape(writer)} is still writing {run_dir}: the report shows what it "
                "has finished so far (results.json is replaced whole, never half-written)",
                highlight=False,
                soft_wrap=True,
            )
        _print_files(run_dir, f"  ({time.perf_counter() - start:.1f} s)")
    except QuantcheckError as error:
        _fail(error, debug)


@app.command("compare-lmeval")
def compare_lmeval(
    run_a: Annotated[
        Path,
        typer.Argument(help="reference: an lm_eval --output_path (or its model folder) written with --log_samples"),
    ],
    run_b: Annotated[Path, typer.Argument(help="variant: the same tasks and documents, another model")],
    out: Annotated[Path, typer.Option(help="folder for report.md and comparison.json")] = Path("lmeval-comparison"),
    metric: Annotated[
        str | None, typer.Option(help="per-sample 0/1 metric (default: acc when logged, else the first 0/1 one)")
    ] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="largest acceptable accuracy loss, in points")] = 2.0,
    debug: bool = False,
) -> None:
    """Compare two lm-eval runs document by document: paired difference, flips, McNemar, verdict per task."""
    from quantcheck.interop.lmeval import compare_runs, read_run
    from quantcheck.interop.lmeval_report import COLUMNS, comparison_file, headline, not_compared, row, write_comparison
    from quantcheck.schema.results import Thresholds

    try:
        if not 0 <= max_accuracy_drop <= 100:
            raise QuantcheckError(f"--max-accuracy-drop must be between 0 and 100 points, got {max_accuracy_drop}")
        comparison = compare_runs(
            read_run(run_a, "RUN_A"),
            read_run(run_b, "RUN_B"),
            metric,
            Thresholds(max_accuracy_drop=max_accuracy_drop / 100),
        )
        document = comparison_file(comparison)
        markdown, json_file = write_comparison(document, out)
        table = Table(title="lm-eval comparison (B against A)")
        for column in COLUMNS:
            table.add_column(column)
        for result in document.rows:
            table.add_row(*row(result))
        stdout = _stdout()
        stdout.print(table)
        stdout.print(headline(document), highlight=False, soft_wrap=True)
        for note in not_compared(document):
            stdout.print(f"[yellow]note[/yellow] {note}", highlight=False, soft_wrap=True)
        stdout.print(f"markdown: {markdown}\nresults: {json_file}", highlight=False)
    except QuantcheckError as error:
        _fail(error, debug)


@app.command("export-lmeval")
def export_lmeval(
    run_dir: Annotated[Path, typer.Argument(help="a quantcheck results folder")],
    out: Annotated[Path, typer.Argument(help="folder for <model>/samples_<task>_<time>.jsonl")],
    task: Annotated[
        str, typer.Option(help="task name in the file names, as an lm-eval task of the same questions would be called")
    ] = "quantcheck",
    debug: bool = False,
) -> None:
    """Write each model's per-question answers as lm-eval --log_samples output (readable by compare-lmeval)."""
    from quantcheck.interop.lmeval_export import export_run

    try:
        for path in export_run(run_dir, out, task):
            print(path)
    except QuantcheckError as error:
        _fail(error, debug)


@app.command()
def schema() -> None:
    """Print the JSON Schema of results.json (one line per item of items.jsonl: ItemRecord in $defs)."""
    import json

    from quantcheck.schema.results import ItemRecord, Results

    document = Results.model_json_schema()
    document.setdefault("$defs", {})["ItemRecord"] = ItemRecord.model_json_schema()
    print(json.dumps(document, indent=2))


SENSITIVITY_FROM_CONFIG = (
    "model", "dataset", "limit", "device", "dtype", "seed", "batch_size", "threads", "skip_generation", "skip_cost",
    "trust_remote_code", "allow_pickle",
)  # fmt: skip
"""What `sensitivity --config` takes from a run's config file (with its thresholds' max_kl): the model, data and
shared settings; never its --out (the run's own folder) nor its variants (--quant names the method to rank)."""


@app.command()
def sensitivity(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            help="a run's config file (RUN_DIR/config.toml): its model, data set, limit, max_kl and shared settings, "
            "each unless typed here; never its --out or variants"
        ),
    ] = None,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
    **options: object,  # SensitivityOptions' fields, as `_with_options` declares them
) -> None:
    """Rank the decoder layers by how far quantizing each one alone moves the model (exact KL, top-1, answer flips),
    then propose which to keep at the reference's precision and measure that mixed variant in an ordinary run."""
    from quantcheck.analysis.format import nats, nats_ci, percent
    from quantcheck.api import sensitivity as rank_layers

    values = {name: value for name, value in ctx.params.items() if name not in ("config", "debug")}
    try:
        if config is not None:  # the run's settings, under each option the user typed
            from quantcheck.config import read_config

            run = read_config(config)
            shared = {name: getattr(run, name) for name in SENSITIVITY_FROM_CONFIG} | {"max_kl": run.thresholds.max_kl}
            values |= {name: value for name, value in shared.items() if not _typed(ctx, name)}
        if values["trust_remote_code"]:
            console.print("[yellow]warning:[/yellow] trust_remote_code runs Python code from the model repository")
        table = rank_layers(**values)
    except QuantcheckError as error:
        _fail(error, debug)
    stdout = _stdout()
    ranking = Table(title=f"{table.method}: one decoder layer quantized at a time ({table.items} questions, exact KL)")
    for column in ("rank", "layer", "mean KL (95% CI)", "top-1 agree", "answer flips"):
        ranking.add_column(column)
    ranked = [(str(rank), escape(layer.name), layer) for rank, layer in enumerate(table.layers, 1)]
    ranked += [("-", f"{escape(layer.name)} (outside the blocks)", layer) for layer in table.outside]
    for rank, name, layer in ranked:
        ranking.add_row(
            rank, name, nats_ci(layer.kl.value, layer.kl.ci), percent(layer.top1_agreement), str(layer.answer_flips)
        )
    stdout.print(ranking)
    whole = table.measured_variant_kl
    stdout.print(
        f"{table.method} whole: predicted mean KL {nats(table.predicted_variant_kl)} (the layers' sum), measured "
        f"{nats_ci(whole.value, whole.ci) if whole else 'not measured'}",
        highlight=False,
    )
    for proposal in table.proposals:
        measured = nats_ci(proposal.measured_kl.value, proposal.measured_kl.ci) if proposal.measured_kl else "not run"
        stdout.print(
            f"[bold]{escape(proposal.variant)}[/bold] ({escape(proposal.rule)}): predicted mean KL "
            f"{nats(proposal.predicted_kl)}, measured {measured}; "
            f"KL check {proposal.kl_check or '-'}, verdict {proposal.decision or '-'}",
            highlight=False,
            soft_wrap=True,
        )
        stdout.print(f"  serve it with: {escape(proposal.serve)}", highlight=False, soft_wrap=True)
    stdout.print(f"sensitivity: {Path(table.run_dir) / 'sensitivity.json'}", highlight=False)
    if not values["quiet"]:
        _print_files(Path(table.run_dir))


_with_options(sensitivity, run_options(SensitivityOptions))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
