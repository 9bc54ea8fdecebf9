"""`quantcheck sensitivity`: which decoder layers a method hurts, then a mixed-precision variant proposed from that
ranking and measured like any other variant.

1. Every check that needs no model: the method can leave layers out, --keep fits the model, the data set is questions.
2. The per-layer scoring (`scoring.sensitivity`) in this process: the reference and the quantized model loaded once,
   each layer quantized alone, ranked on exact KL over the reference's full rows. A GGUF type has no in-place swap:
   one file per block with that block alone quantized, each loaded once and scored against the F32 GGUF.
3. The plain method (where it measures within --max-kl there is nothing to keep), then the proposal (`propose_keep`),
   run through the ordinary runner into one run folder, with the full reference store so that their KL is exact like
   the ranking's: accuracy, KL, flips, cost and verdict beside the prediction are all measured. A
   proposal whose measured mean KL is above --max-kl is followed by the next one (one more layer kept), up to
   `MAX_TRIES` in all; --keep N is measured as asked.
4. sensitivity.json in the run folder after every measurement.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from quantcheck.data.items import Item
from quantcheck.data.load import DEFAULT_DATASET, load_dataset
from quantcheck.errors import QuantcheckError, QuantMethodError
from quantcheck.models.quant_methods import REGISTRY, LoadRequest, QuantMethod, mixed_method
from quantcheck.orchestration.progress import ProgressView
from quantcheck.orchestration.runner import RunOptions, default_out_dir, run
from quantcheck.schema.models import GenerationOptions
from quantcheck.schema.results import ModelResult, Thresholds
from quantcheck.schema.sensitivity import LayerSensitivity, Proposal, SensitivityTable
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import StoreSettings, write_json_atomic, write_text_atomic
from quantcheck.tasks import task_for

MAX_TRIES = 3
"""Proposals measured at most: the first, and up to two more that each keep one more layer."""


class SensitivityOptions(BaseModel):
    """What `quantcheck sensitivity` and `quantcheck.sensitivity()` take."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="hub id or local folder; default: the built-in smollm2-135m")
    quant: str = Field(description="the method whose layers are ranked: bnb-*, torchao-*, quanto-*, hqq-* or gguf:TYPE")
    dataset: str = Field(DEFAULT_DATASET, description="mmlu:<subject>[,<subject>], mmlu:all, or a .csv/.jsonl file")
    limit: PositiveInt | None = Field(None, description="score a seeded random sample of N questions")
    keep: PositiveInt | None = Field(
        None, description="keep the N most sensitive layers (default: as few as bring the KL within --max-kl)"
    )
    max_kl: float = Field(0.05, ge=0, description="largest acceptable mean KL, in nats: what the proposal aims at")
    device: str = Field("auto", description="cpu, cuda or auto")
    dtype: str | None = Field(None, description="reference precision: float32, bfloat16, float16")
    out: Path | None = Field(None, description="results folder; the same folder resumes the measured variants")
    seed: int = Field(0, description="seeds the question sample, sampling and the bootstrap intervals")
    batch_size: PositiveInt = Field(8, description="items per forward pass")
    threads: PositiveInt | None = Field(None, description="torch threads (default: physical cores)")
    skip_generation: bool = Field(False, description="measured variants: skip generative scoring")
    skip_cost: bool = Field(False, description="measured variants: skip memory/latency/throughput")
    force: bool = Field(False, description="overwrite an --out folder that holds a different run")
    trust_remote_code: bool = Field(False, description="run the model repository's own Python code")
    allow_pickle: bool = Field(False, description="allow pickle (.bin) checkpoints")
    quiet: bool = Field(False, description="no progress output")

    def run_options(self, quants: list[str], out: Path) -> RunOptions:
        """The ordinary run of the plain method and the proposals, with the reference's full rows stored."""
        return RunOptions(
            model=self.model,
            quants=quants,
            dataset=self.dataset,
            limit=self.limit,
            device=self.device,
            dtype=self.dtype,
            out=out,
            seed=self.seed,
            batch_size=self.batch_size,
            store=StoreSettings(kind="full"),
            threads=self.threads,
            generation=None if self.skip_generation else GenerationOptions(),
            cost=not self.skip_cost,
            thresholds=Thresholds(max_mean_kl=self.max_kl),
            force=self.force,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            quiet=self.quiet,
        )


def run_sensitivity(options: SensitivityOptions) -> SensitivityTable:
    """Rank the layers, then propose and measure mixed-precision variants; the table is RUN_DIR/sensitivity.json."""
    from quantcheck.models.loading import DTYPES, decoder_layer_count, pick_device, resolve_model

    subject = _subject(options.quant)
    model = resolve_model(options.model, options.allow_pickle)
    layer_count = decoder_layer_count(model.path)
    if options.keep is not None and options.keep > layer_count:
        raise QuantcheckError(
            f"--keep {options.keep} is more than the model's {layer_count} decoder layers: give 1..{layer_count}"
        )
    if task_for(options.dataset).every_token:
        raise QuantcheckError(
            "sensitivity scores questions (mmlu:..., a .csv or .jsonl file), not text: or prompts: data sets"
        )
    dataset = load_dataset(options.dataset, options.limit, options.seed)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise QuantcheckError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    out = options.out or default_out_dir()
    RunFolder(out).refuse_foreign(options.force)  # before minutes of scoring, as the runner would refuse it
    device = pick_device(options.device)
    if subject.method is not None:
        subject.method.check_runnable(device)
    elif device != "cpu":
        raise QuantMethodError(f"{subject.variant} runs on cpu only (llama-cpp-python built for CPU): use --device cpu")
    view = ProgressView(options.quiet)
    request = _request(options, str(model.path), device)

    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "sensitivity.log"
        outside: list[LayerSensitivity] = []  # no transformers method here quantizes the embeddings or the head
        if subject.method is not None:
            layers, seconds = _score(options, subject.method, request, dataset.items, log, view)
        else:
            layers, outside, seconds = _score_gguf(options, subject.gguf_type, request, dataset.items, log, view)
        view.line(f"{subject.variant}: {len(layers)} decoder layers scored one at a time in {seconds:.0f} s")
        table = SensitivityTable(
            model=model.name,
            method=subject.variant,
            dataset=dataset.spec,
            items=len(dataset.items),
            run_dir=str(out),
            max_kl=options.max_kl,
            seconds=seconds,
            layers=layers,
            outside=outside,
            predicted_variant_kl=sum(layer.kl.value for layer in [*layers, *outside]),
        )
        _measure(options, subject, request, table, layer_count, out, view)
        write_text_atomic(RunFolder(out).sensitivity_log, log.read_text(errors="replace"))
    return table


def _request(options: SensitivityOptions, path: str, device: str) -> LoadRequest:
    import torch

    from quantcheck.models.loading import default_dtype

    return LoadRequest(
        path=path,
        device=device,
        dtype=getattr(torch, options.dtype or default_dtype(device)),
        trust_remote_code=options.trust_remote_code,
        allow_pickle=options.allow_pickle,
    )


@dataclass(frozen=True)
class Subject:
    """What is ranked: a transformers method (each layer swapped into one loaded model) or a GGUF type (one file with
    one block quantized per layer: a GGUF has no in-place swap)."""

    variant: str  # the plain variant's --quant spelling: bnb-nf4, gguf:Q2_K
    method: QuantMethod | None = None
    gguf_type: str | None = None

    def mixed(self, keep: tuple[int, ...]) -> str:
        return mixed_method(self.variant, keep)

    def serve(self, request: LoadRequest, keep: tuple[int, ...]) -> str:
        """How a user makes the mixed variant: the quantization config as code, or llama-quantize's arguments."""
        if self.method is not None:
            from quantcheck.models.loading import kept_modules

            kept = kept_modules(request.path, keep, request.trust_remote_code) if keep else ()
            return self.method.serve(replace(request, keep=kept))
        from quantcheck.backends.llamacpp import kept_type

        command = f"llama-quantize {{}}model-F32.gguf model-{self.gguf_type}-mixed.gguf {self.gguf_type}"
        if not keep:
            return command.format("")
        kept = kept_type(Path(request.path))[0]
        return command.format("--tensor-type-file TYPES.txt ") + (
            f" (TYPES.txt: blocks {', '.join(map(str, keep))} at {kept} and every other tensor at the type plain "
            f"{self.gguf_type} gives it, one ^NAME$=TYPE each; quantcheck keeps it beside the measured GGUF in its "
            "cache as *.tensor-types.txt)"
        )


def _subject(text: str) -> Subject:
    """The method named by --quant: a transformers method that can leave a layer out, or a GGUF type; anything else is
    refused in one line."""
    from quantcheck.backends import get_backend
    from quantcheck.backends.llamacpp import GGUF_TYPES, PREFIX, UNQUANTIZED_TYPES
    from quantcheck.backends.variants import parse_variant_text

    variant = parse_variant_text(text)
    if variant.backend == "llamacpp" and not variant.options:
        llamacpp = get_backend("llamacpp")
        llamacpp.method_info(variant.body)  # an unknown type lists the valid ones
        if variant.body in UNQUANTIZED_TYPES:
            raise QuantMethodError(f"{text} is not quantized: give a quantized GGUF type ({', '.join(GGUF_TYPES)})")
        llamacpp.interpreter()  # llama-cpp-python installed, or one line saying how
        return Subject(variant=f"{PREFIX}:{variant.body}", gguf_type=variant.body)
    if variant.backend != "hf" or variant.options or variant.body not in REGISTRY:
        if variant.backend == "hf" and not variant.options:
            get_backend("hf").method_info(variant.body)  # an unknown method lists the valid ones
        raise QuantMethodError(
            f"{text}: sensitivity takes one transformers method (bnb-*, torchao-*, quanto-*, hqq-*) or one GGUF type "
            "(gguf:Q4_K_M, ...), without options"
        )
    method = REGISTRY[variant.body]
    method.check_keeps()
    return Subject(variant=method.name, method=method)


def _score(
    options: SensitivityOptions,
    method: QuantMethod,
    request: LoadRequest,
    items: tuple[Item, ...],
    log: Path,
    view: ProgressView,
) -> tuple[list[LayerSensitivity], float]:
    """Load the two models once (their libraries' output to `log`), then score every layer; the scoring's seconds."""
    import torch

    from quantcheck.cost.scenario import default_threads
    from quantcheck.models.builtin import output_to
    from quantcheck.models.loading import load_tokenizer
    from quantcheck.scoring.loglik import encode_items, model_batches
    from quantcheck.scoring.sensitivity import load_pair, score_layers

    torch.set_num_threads(options.threads or default_threads())
    tokenizer = load_tokenizer(request.path, options.trust_remote_code)
    encoded = encode_items(tokenizer, items)
    view.line(f"loading the reference and {method.name}, once each")
    with output_to(log):
        reference, quantized = load_pair(method, request)
    steps = sum(1 for _ in model_batches(encoded, options.batch_size)) * len(reference.get_decoder().layers)
    started = time.perf_counter()
    with view, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bnb int8 warns on every forward that it casts its inputs
        view.start_job(method.name)
        view.handle({"event": "phase", "phase": "one layer at a time", "total": steps})
        ranked = score_layers(
            reference,
            quantized,
            items,
            encoded,
            batch_size=options.batch_size,
            pad_id=tokenizer.pad_token_id,
            seed=options.seed,
            on_step=lambda: view.handle({"event": "advance"}),
        )
    return ranked, time.perf_counter() - started


def _score_gguf(
    options: SensitivityOptions,
    gguf_type: str,
    request: LoadRequest,
    items: tuple[Item, ...],
    log: Path,
    view: ProgressView,
) -> tuple[list[LayerSensitivity], list[LayerSensitivity], float]:
    """Every decoder block quantized alone to TYPE, one file and one load per block (llama.cpp's output to `log`), each
    against the reference's F32 GGUF in the same engine, so the engine floor cancels; then each tensor outside the
    blocks that TYPE quantizes (the token embeddings, the output head), alone; the scoring's seconds, files
    included."""
    import torch

    from quantcheck.backends.llamacpp import answer_rows, prepare_gguf, quantize_only, quantized_outside_blocks
    from quantcheck.cost.scenario import default_threads
    from quantcheck.models.builtin import output_to
    from quantcheck.models.loading import decoder_layer_count, load_tokenizer
    from quantcheck.scoring.loglik import encode_items
    from quantcheck.scoring.sensitivity import ReferenceRows, compare_rows, ranked_layers

    threads = options.threads or default_threads()
    reference_path = Path(request.path)
    encoded = encode_items(load_tokenizer(request.path, options.trust_remote_code), items)
    rows = list(range(len(items)))
    count = decoder_layer_count(reference_path)
    started = time.perf_counter()
    with output_to(log):
        outside = quantized_outside_blocks(reference_path, gguf_type, threads)
    parts = [f"blk.{index}" for index in range(count)] + outside
    view.line(
        f"the reference as an F32 GGUF, then {len(parts)} files with one part at {gguf_type} each: {count} decoder "
        f"blocks{''.join(f', {name}' for name in outside)}"
    )
    with output_to(log):
        full = prepare_gguf(reference_path, "F32", threads)
        logprobs = torch.from_numpy(answer_rows(full, encoded.prompt_ids, threads))
    reference = ReferenceRows.of(logprobs, rows, items, encoded)
    kl, same_top1, same_answer = (np.zeros((len(parts), len(items)), dtype=kind) for kind in (float, bool, bool))
    with view:
        view.start_job(gguf_type)
        view.handle({"event": "phase", "phase": "one part at a time", "total": len(parts)})
        for row, part in enumerate(parts):
            with output_to(log):
                path = quantize_only(reference_path, gguf_type, part, log.with_name("part.gguf"), threads)
                logprobs = torch.from_numpy(answer_rows(path, encoded.prompt_ids, threads))
            path.unlink()
            kl[row], same_top1[row], same_answer[row] = compare_rows(reference, logprobs, rows, items, encoded)
            view.handle({"event": "advance"})
    ranked = ranked_layers(parts, kl, same_top1, same_answer, options.seed)
    blocks = [layer for layer in ranked if layer.index < count]
    beyond = [layer.model_copy(update={"index": -1}) for layer in ranked if layer.index >= count]
    return blocks, beyond, time.perf_counter() - started


def _measure(
    options: SensitivityOptions,
    subject: Subject,
    request: LoadRequest,
    table: SensitivityTable,
    layer_count: int,
    out: Path,
    view: ProgressView,
) -> None:
    """Propose, run the plain method and the proposals so far through the runner (resuming what is finished), and go
    on while the measured mean KL is above --max-kl (the greedy rule only, up to MAX_TRIES proposals)."""
    from quantcheck.scoring.sensitivity import propose_keep

    # The plain method first: where it already measures within --max-kl, there is nothing to keep.
    _, results = run(options.run_options([subject.variant], out))
    plain = next((result for result in results.models if result.name == subject.variant), None)
    table.measured_variant_kl = plain.agreement.kl.mean if plain and plain.agreement else None
    write_json_atomic(RunFolder(out).sensitivity_file, table)
    if options.keep is None and table.measured_variant_kl and table.measured_variant_kl.value <= options.max_kl:
        view.line(f"{subject.variant} measures within --max-kl {options.max_kl} as it is: no layer needs keeping")
        return
    count = options.keep
    for _ in range(MAX_TRIES):
        beyond = sum(layer.kl.value for layer in table.outside)  # quantized in every proposal
        keep, predicted = propose_keep(table.layers, options.max_kl, count, beyond)
        if not keep:  # the layers' sum is within --max-kl but the plain method measured above it: keep one at least
            keep, predicted = propose_keep(table.layers, options.max_kl, 1, beyond)
        variant = subject.mixed(tuple(keep))
        if options.keep is not None:
            rule = f"--keep {count}: the {count} layers of highest mean KL"
        elif not table.proposals:
            rule = f"greedy: the highest-KL layers kept until the others' mean KL sums to at most {options.max_kl}"
        else:
            rule = "the previous proposal measured above --max-kl: one more layer kept"
        proposal = Proposal(
            keep=keep,
            variant=variant,
            rule=rule,
            predicted_kl=predicted,
            serve=subject.serve(request, tuple(keep)),
        )
        table.proposals.append(proposal)
        view.line(f"proposal: {variant}, predicted mean KL {predicted:.4g} nats: measuring it")
        quants = list(dict.fromkeys([subject.variant, *(measured.variant for measured in table.proposals)]))
        _, results = run(options.run_options(quants, out))
        by_name = {result.name: result for result in results.models}
        _record(proposal, by_name.get(variant), options.max_kl)
        plain = by_name.get(subject.variant)
        table.measured_variant_kl = plain.agreement.kl.mean if plain and plain.agreement else None
        write_json_atomic(RunFolder(out).sensitivity_file, table)
        if options.keep is not None or proposal.within_max_kl is not False or len(keep) == layer_count:
            return
        count = len(keep) + 1


def _record(proposal: Proposal, result: ModelResult | None, max_kl: float) -> None:
    """The measured numbers beside the prediction (none where the variant failed to run)."""
    if result is None or result.agreement is None:
        return
    proposal.measured_kl = result.agreement.kl.mean
    proposal.within_max_kl = proposal.measured_kl.value <= max_kl
    if result.verdict is not None:
        proposal.decision = result.verdict.decision
        proposal.kl_check = result.verdict.checks.get("mean KL")
