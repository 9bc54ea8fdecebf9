"""A run's settings as one validated object: what `quantcheck run`'s options, a `--config` TOML file
and `quantcheck.compare()`'s keywords all become before anything runs.

One layout for the three, with the command line's names and units (a user who knows `--max-kl`
guesses `max_kl`); options that belong together sit in a table:

    model = "smollm2-135m"                  # hub id or local folder; left out: the built-in model
    backend = "hf"                          # the reference's engine
    reference_url = "http://127.0.0.1:8000/v1#MODEL"  # or: the reference is served there
                                            # (MODEL's folder gives its tokenizer)
    reference_kld = "base.kld"              # or: read from a llama-perplexity --kl-divergence-base file
                                            # (its text's windows)
    variants = ["bnb-nf4-dq", "vllm:bf16"]  # --quant, once per variant
    dataset = "mmlu:virology"               # or "text:FILE", a text corpus scored at every token
    limit = 200
    context = 512                           # a text corpus's window length
    [generation]   chat, temperature, greedy, max_new_tokens, batch_size (--gen-batch-size)
    [calibration]  source (--calibration), samples, seq_len: what calibrated variants calibrate on unless they
                   name their own data (llmc:RECIPE?calibration=..., gguf:TYPE?imatrix=...)
    [cost]         rounds (--cost-rounds), batch_sizes = [1, 8, 32], seq_len, iterations, time_budget, max_memory_gb
    [store]        kind (--store: compact or full), top_k (--store-top-k), tail_samples (--store-tail-samples)
    [engine.vllm]  tensor_parallel_size, pipeline_parallel_size, distributed_executor_backend,
                   gpu_memory_utilization, max_model_len, enforce_eager, cpu_kv_cache_gb (each engine's own
                   table: `Backend.settings_model`; a saved flat [engine] of vLLM keys is still read)
    [engine.llamacpp] n_ctx
    [thresholds]   max_accuracy_drop (points), max_kl, min_top1, min_memory_saving
    prefer = "memory"                       # which passing variant to recommend: memory, speed or quality
    fit_gb = 4.0                            # only variants whose measured weights fit in 4 GiB are recommended
    fail_on = "dont"                        # `quantcheck run` exits 1 when the recommendation is this (or worse);
                                            # "dont:gguf:Q4_K_M": when that variant's own verdict is

Validated once, here: an unknown key or a wrong type is one line naming where it came from.
Relative paths are relative to the current folder, as on the command line. A run writes what it
resolved to RUN_DIR/config.toml (`resolved_toml`), which `quantcheck run --config` runs again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from quantcheck.backends import DEFAULT_BACKEND, settings_models
from quantcheck.data.chats import PROMPTS_PREFIX
from quantcheck.data.corpus import TEXT_PREFIX
from quantcheck.data.load import DEFAULT_DATASET
from quantcheck.errors import QuantcheckError
from quantcheck.schema.models import MIN_CONTEXT, Calibration, GenerationOptions
from quantcheck.schema.results import Preference, Thresholds
from quantcheck.storage.store import StoreSettings

if TYPE_CHECKING:
    from quantcheck.orchestration.runner import RunOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

CONFIG_FILE = "config.toml"
GIB = 2**30
Location = tuple[str | int, ...]

# A notebook passes Path objects where the command line passes text.
PathText = Annotated[str, BeforeValidator(lambda value: os.fspath(value) if isinstance(value, os.PathLike) else value)]
CLI_PATH = "read as a path on the command line"
FileText = Annotated[PathText, CLI_PATH]
"""A file's path (`run` reads it as a path); a model or data set is text: a hub id or a name."""


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CostConfig(_Table):
    """The cost sweep; what is left out takes the device's defaults (see `CostSettings.for_device`)."""

    rounds: PositiveInt = Field(
        2,
        description="cost measured this many times per model, the models in turn (ABAB); each point keeps its fastest "
        "round",
    )
    batch_sizes: list[PositiveInt] | None = Field(
        None, min_length=1, description="latency sweep batch sizes, e.g. 1,2,4,8,16,32"
    )
    seq_len: PositiveInt | None = Field(None, description="latency sweep sequence length")
    iterations: PositiveInt | None = Field(None, description="most timed iterations per batch size")
    time_budget: PositiveFloat | None = Field(None, description="seconds of timing per batch size at most")
    max_memory_gb: PositiveFloat | None = Field(
        None,
        description="memory cap for the cost sweep: above it a batch size counts as OOM; with --allow-offload, instead "
        "what a transformers model may hold on its device (accelerate offloads the rest)",
    )

    def overrides(self) -> dict[str, object]:
        """The `CostSettings` fields the user set, in its names and units."""
        values = {
            "batch_sizes": sorted(set(self.batch_sizes)) if self.batch_sizes else None,
            "seq_len": self.seq_len,
            "max_iterations": self.iterations,
            "time_budget_s": self.time_budget,
            "max_memory_bytes": int(self.max_memory_gb * GIB) if self.max_memory_gb else None,
        }
        return {name: value for name, value in values.items() if value is not None}


def _engine_config() -> type[_Table]:
    """`[engine.NAME]`: a table for each registered backend that declares settings (`Backend.settings_model`), its keys
    that backend's own."""
    fields = {name: (model, Field(default_factory=model)) for name, model in settings_models().items()}
    return create_model("EngineConfig", __base__=_Table, **fields)


EngineConfig = _engine_config()
RENAMED_ENGINE_KEYS = {
    **{key: (("vllm", key),) for key in EngineConfig.model_fields["vllm"].annotation.model_fields},
    "max_model_len": (("vllm", "max_model_len"), ("llamacpp", "n_ctx")),
}
"""Before each engine had its table, `[engine]` held vLLM's settings, and llama.cpp read max_model_len as its n_ctx:
a saved config.toml of that layout still runs."""


class ThresholdConfig(_Table):
    """The verdict's limits as the command line takes them: the accuracy drop in points."""

    max_accuracy_drop: float = Field(2.0, ge=0, le=100, description="largest acceptable accuracy loss, in points")
    max_kl: float = Field(0.05, ge=0, description="largest acceptable mean KL, in nats")
    min_top1: float = Field(0.90, ge=0, le=1, description="smallest acceptable top-1 agreement, 0-1")
    min_memory_saving: float = Field(0.20, ge=0, le=1, description="weight memory a variant must save, 0-1")

    def thresholds(self) -> Thresholds:
        return Thresholds(
            max_accuracy_drop=self.max_accuracy_drop / 100,
            max_mean_kl=self.max_kl,
            min_top1_agreement=self.min_top1,
            min_memory_saving=self.min_memory_saving,
        )


class RunConfig(_Table):
    """Everything `quantcheck run` takes, in the layout of a config file (see the module docstring)."""

    model: PathText | None = Field(None, description="hub id or local folder; default: the built-in smollm2-135m")
    backend: str = Field(
        DEFAULT_BACKEND, description="engine that runs the reference: hf (transformers), vllm or llamacpp"
    )
    variants: list[str] = Field(
        default_factory=list,
        description="variant to compare (repeat): METHOD, vllm:METHOD, gguf:TYPE, gguf:FILE.gguf, pretrained:PATH, "
        "url:URL[#MODEL]; see `quantcheck quants`",
    )
    reference_url: str | None = Field(
        None,
        description="the reference is served there: URL[#MODEL][?top_logprobs=K] of an OpenAI-compatible API; MODEL "
        "(the argument) gives its tokenizer. API key: QUANTCHECK_API_KEY or OPENAI_API_KEY",
    )
    reference_kld: FileText | None = Field(
        None,
        description="the reference as a llama-perplexity --kl-divergence-base file recorded it (MODEL gives its "
        "tokenizer): variants are scored on its windows, nothing of the reference runs",
    )
    dataset: PathText = Field(
        DEFAULT_DATASET,
        description="mmlu:<subject>[,<subject>], mmlu:all, a .csv/.jsonl file of questions, text:FILE (a text corpus "
        "scored at every token; text:builtin is the one shipped), or prompts:FILE.jsonl (your chats, scored on the "
        "reference's answers)",
    )
    limit: PositiveInt | None = Field(
        None, description="score a seeded random sample of N questions (a text corpus: its first N windows)"
    )
    context: int = Field(
        512,
        ge=MIN_CONTEXT,
        description="text corpus: tokens per window; the second half of each is scored (llama-perplexity's -c)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cpu, cuda or auto")
    dtype: str | None = Field(
        None, description="reference precision: float32, bfloat16, float16 (default fp32 on CPU, bf16 on CUDA)"
    )
    out: Path | None = Field(None, description="results folder; the same folder resumes a run")
    seed: int = Field(0, description="seeds the question sample, sampling and the bootstrap intervals")
    batch_size: PositiveInt = Field(8, description="items per forward pass in quality scoring")
    threads: PositiveInt | None = Field(
        None, description="torch threads, the same for every model (default: physical cores)"
    )
    skip_quality: bool = Field(False, description="skip log-likelihood and generative scoring")
    skip_generation: bool = Field(False, description="skip generative scoring only")
    skip_cost: bool = Field(False, description="skip memory/latency/throughput measurement")
    floors: bool = Field(
        True,
        description="measure the noise under the comparison: each model scored twice by its engine with two batch "
        "plans, and the reference sampled again",
    )
    force: bool = Field(False, description="overwrite an --out folder that holds a different run")
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (only if you trust it)"
    )
    allow_offload: bool = Field(
        False,
        description="allow device_map offload to CPU/disk (beyond --max-memory-gb, if set); an offloaded model is "
        "warned of in results.json and the report",
    )
    allow_pickle: bool = Field(False, description="allow pickle (.bin) checkpoints, which can run code when loaded")
    quiet: bool = Field(False, description="no progress output")
    generation: GenerationOptions = GenerationOptions()
    calibration: Calibration = Calibration()
    cost: CostConfig = CostConfig()
    store: StoreSettings = StoreSettings()
    engine: EngineConfig = EngineConfig()
    thresholds: ThresholdConfig = ThresholdConfig()
    prefer: Preference = Field(
        "memory", description="which passing variant to recommend: memory (the smallest), speed or quality"
    )
    fit_gb: PositiveFloat | None = Field(
        None, description="recommend only a variant whose weights, as measured, fit in this many GiB"
    )
    fail_on: str | None = Field(
        None,
        description="for CI: exit 1 (after every file is written) when the recommendation is dont (no variant passes) "
        "or inconclusive (no variant passes yet, or none does); dont:VARIANT or inconclusive:VARIANT judge that "
        "variant's own verdict (the one you ship)",
    )

    @field_validator("fail_on")
    @classmethod
    def _gate(cls, value: str | None) -> str | None:
        level, colon, variant = (value or "dont").partition(":")
        if level not in ("dont", "inconclusive") or colon and not variant:
            raise PydanticCustomError(
                "fail_on", "takes dont or inconclusive, or LEVEL:VARIANT for one variant's verdict (dont:gguf:Q4_K_M)"
            )
        return value

    def options(self) -> RunOptions:
        """The runner's input: fractions, bytes and the phases to run (the runner loads only when a run starts)."""
        from quantcheck.orchestration.runner import RunOptions

        quality = not self.skip_quality
        return RunOptions(
            model=self.model,
            backend=self.backend,
            reference_url=self.reference_url,
            reference_kld=self.reference_kld,
            quants=self.variants,
            calibration=self.calibration,
            engine=self.engine.model_dump(),
            dataset=self.dataset,
            limit=self.limit,
            context=self.context,
            device=self.device,
            dtype=self.dtype,
            out=self.out,
            seed=self.seed,
            batch_size=self.batch_size,
            store=self.store,
            threads=self.threads,
            loglik=quality,
            generation=self.generation if quality and not self.skip_generation else None,
            cost=not self.skip_cost,
            cost_settings=self.cost.overrides(),
            floors=self.floors,
            cost_rounds=self.cost.rounds,
            thresholds=self.thresholds.thresholds(),
            prefer=self.prefer,
            fit_gb=self.fit_gb,
            gate_variant=self.fail_on.partition(":")[2] or None if self.fail_on else None,
            force=self.force,
            trust_remote_code=self.trust_remote_code,
            allow_offload=self.allow_offload,
            allow_pickle=self.allow_pickle,
            quiet=self.quiet,
        )


OPTION_NAMES = {
    "variants": "quant",
    "generation.batch_size": "gen_batch_size",
    "calibration.source": "calibration",
    "calibration.samples": "calibration_samples",
    "calibration.seq_len": "calibration_seq_len",
    "cost.rounds": "cost_rounds",
    "store.kind": "store",
    "store.top_k": "store_top_k",
    "store.tail_samples": "store_tail_samples",
}
"""The keys whose `run` option is not named after the key's last part."""


@dataclass(frozen=True)
class RunOption:
    """One setting as a command takes it: a key of a config file for `run` and `plan`, a field of
    `SensitivityOptions` for `sensitivity` (`cli._with_options` makes the option from `field`)."""

    name: str  # the option's name, with _ for - ("gen_batch_size": --gen-batch-size)
    key: str  # its place in a config file ("generation.batch_size")
    field: FieldInfo


def run_options(table: type[BaseModel] = RunConfig, prefix: str = "") -> list[RunOption]:
    """Every key of `table` and of the tables in it, in their order."""
    options = []
    for name, field in table.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            options += run_options(field.annotation, f"{prefix}{name}.")
        else:
            options.append(RunOption(OPTION_NAMES.get(prefix + name, name), prefix + name, field))
    return options


def parse_config(data: Mapping[str, object], where: Callable[[Location], str]) -> RunConfig:
    """Validate `data`; the first problem becomes one line, `where(location)` naming its source. A key renamed since
    a config could be saved is read under its new name, with one line on stderr saying so."""
    data = _renamed(data, where)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        location = tuple(problem["loc"])
        message = _unknown_key(location) if problem["type"] == "extra_forbidden" else problem["msg"]
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise QuantcheckError(f"{where(location)}: {message}{more}") from None


def _renamed(data: Mapping[str, object], where: Callable[[Location], str]) -> Mapping[str, object]:
    engine = data.get("engine")
    if not isinstance(engine, Mapping):
        return data
    engine, moved = dict(engine), []
    for old in [key for key in engine if key in RENAMED_ENGINE_KEYS]:
        value = engine.pop(old)
        for table, key in RENAMED_ENGINE_KEYS[old]:
            engine.setdefault(table, {}).setdefault(key, value)  # the new key, where also given, wins
        new_keys = " and ".join(f"engine.{table}.{key}" for table, key in RENAMED_ENGINE_KEYS[old])
        moved.append(f"{where(('engine', old))} is now {new_keys}")
    if moved:
        print(f"note: {'; '.join(moved)} (read as before)", file=sys.stderr)
    return {**data, "engine": engine}


def key_path(location: Location) -> str:
    """('thresholds', 'max_kl') -> 'thresholds.max_kl'; list positions as [i]."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")


def _unknown_key(location: Location) -> str:
    table: type[BaseModel] = RunConfig
    for part in location[:-1]:
        table = table.model_fields[str(part)].annotation
    return f"unknown key; known keys here: {', '.join(table.model_fields)}"


def read_config(path: Path) -> RunConfig:
    """A TOML config file, validated; every problem names the file and the key."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise QuantcheckError(f"{path}: cannot read the config file: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise QuantcheckError(f"{path}: not valid TOML: {error}") from None
    return parse_config(data, lambda location: f"{path}: {key_path(location)}")


def resolved_toml(config: RunConfig, used: Mapping[str, object]) -> str:
    """The config a run used, as TOML that runs it again from any folder.

    Paths become absolute; out, device, dtype and threads are the ones `used` (results.json's
    config) records. `force` and `quiet` are left out: they say how to treat a folder and the terminal,
    not what is measured, and a replay should never overwrite a folder unasked.
    """
    resolved = config.model_copy(
        update={
            "model": _absolute(config.model),
            "dataset": _absolute_dataset(config.dataset),
            "calibration": config.calibration.model_copy(
                update={"source": _absolute_dataset(config.calibration.source)}
            ),
            "reference_kld": _absolute(config.reference_kld),
            "out": Path(str(used["out"])).resolve(),
            "variants": [_absolute_checkpoint(variant) for variant in config.variants],
            "device": used["device"],
            "dtype": used["dtype"],
            "threads": used["threads"],
        }
    )
    data = resolved.model_dump(exclude_none=True, exclude={"force", "quiet"})
    lines = [
        "# The settings of this run, as resolved. Run it again into another folder:",
        f"#   quantcheck run --config {CONFIG_FILE} --out NEW_FOLDER",
    ]
    return "\n".join(lines + _toml_table(data)) + "\n"


def _toml_table(values: Mapping[str, object], name: str = "") -> list[str]:
    """A table's own keys, then each table inside it as [name.inner] (a table of tables only as its tables)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if not isinstance(value, dict)]
    for key, inner in values.items():
        if isinstance(inner, dict):
            own = any(not isinstance(value, dict) for value in inner.values())
            lines += [*(["", f"[{name}{key}]"] if own else []), *_toml_table(inner, f"{name}{key}.")]
    return lines


def _absolute(text: str | None) -> str | None:
    from quantcheck.models.builtin import BUILTIN_NAME

    if text is None or text == BUILTIN_NAME or not Path(text).expanduser().exists():
        return text  # the built-in model, a hub id, an MMLU subject
    return str(Path(text).expanduser().resolve())


def _absolute_dataset(dataset: str) -> str:
    """'text:./corpus.txt' -> 'text:/abs/corpus.txt', 'prompts:./p.jsonl' likewise (a data set or calibration data);
    other data sets as `_absolute`."""
    for prefix in (TEXT_PREFIX, PROMPTS_PREFIX):
        if dataset.startswith(prefix):
            return prefix + _absolute(dataset.removeprefix(prefix))
    return _absolute(dataset)


def _absolute_checkpoint(variant: str) -> str:
    """'vllm:pretrained:./awq' -> 'vllm:pretrained:/abs/awq'; other variants as they are."""
    from quantcheck.backends.variants import PRETRAINED

    head, marker, source = variant.partition(f"{PRETRAINED}:")
    return head + marker + _absolute(source) if marker and source else variant


def _toml_value(value: object) -> str:
    """TOML for the config's scalars and lists; strings as JSON strings, which TOML reads the same
    (apart from DEL, which TOML wants escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
