"""Resolving MODEL to a local folder, and loading the reference or a variant with its guards.

The guards exist because of the original experiment's biggest mistake: a baseline that silently
ran in fp32 and was partly offloaded to the CPU. Here the dtype is always explicit and recorded, and
a model with offloaded or meta parameters is refused unless the user asked for offloading.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quantcheck.errors import ModelNotFoundError, QuantcheckError
from quantcheck.models.builtin import BUILTIN_NAME, BUILTIN_NOTE, builtin_model_dir
from quantcheck.models.quant_methods import LoadRequest, QuantMethod
from quantcheck.schema.results import ModelInfo, PrecisionInfo

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = ("float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ResolvedModel:
    """A model the workers can load without touching the network."""

    name: str
    source: str  # builtin | local | hub
    path: Path
    revision: str | None
    notes: tuple[str, ...] = ()

    def info(self, dtype: str, device: str) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            source=self.source,  # type: ignore[arg-type]
            path=str(self.path),
            revision=self.revision,
            reference_dtype=dtype,
            device=device,
            notes=list(self.notes),
        )


def resolve_model(spec: str | None, allow_pickle: bool = False) -> ResolvedModel:
    """Turn the MODEL argument into a local folder: the built-in model, a folder, or a hub download."""
    if spec is None or spec == BUILTIN_NAME:
        path = builtin_model_dir()
        return ResolvedModel(BUILTIN_NAME, "builtin", path, fingerprint(path), (BUILTIN_NOTE,))
    folder = Path(spec).expanduser()
    if folder.exists():
        _check_model_folder(folder, allow_pickle)
        return ResolvedModel(folder.resolve().name, "local", folder.resolve(), fingerprint(folder))
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model folder {spec} does not exist: pass an existing folder, a hub id like org/name, "
            f"or omit MODEL for the built-in {BUILTIN_NAME}"
        )
    path, revision = _download_from_hub(spec, allow_pickle)
    _check_model_folder(path, allow_pickle)
    return ResolvedModel(spec, "hub", path, revision)


def _download_from_hub(repo_id: str, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise ModelNotFoundError(
            f"cannot fetch {repo_id} from the Hugging Face hub ({reason}); offline? pass a local model folder, "
            f"or omit MODEL to use the built-in {BUILTIN_NAME}"
        ) from None
    return local, local.name  # snapshot folders are named after the commit hash


def _check_model_folder(folder: Path, allow_pickle: bool) -> None:
    if not folder.is_dir() or not (folder / "config.json").exists():
        raise ModelNotFoundError(
            f"{folder} is not a model folder (no config.json): pass a folder saved with save_pretrained"
        )
    weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    if not any(p.suffix == ".safetensors" for p in weights):
        if weights and not allow_pickle:
            raise QuantcheckError(
                f"{folder} has only pickle checkpoints ({weights[0].name}), which can run code when loaded: "
                "convert to safetensors, or pass --allow-pickle if you trust it"
            )
        if not weights:
            raise ModelNotFoundError(f"{folder} has no weight files (*.safetensors): is the download complete?")


def fingerprint(folder: Path) -> str:
    """A cheap content identity: config plus the size and head/tail bytes of every weight file."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in _WEIGHT_SUFFIXES or path.name.startswith("tokenizer"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                if size > 1 << 20:
                    handle.seek(max(size - (1 << 20), 1 << 20))
                    digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise QuantcheckError(
            "--device cuda was asked for but torch sees no CUDA GPU: use --device cpu, or install a CUDA build of torch"
        )
    return requested


def default_dtype(device: str) -> str:
    """fp32 on CPU (no fast bf16 on most CPUs), bf16 on CUDA: chosen on purpose and recorded."""
    return "float32" if device == "cpu" else "bfloat16"


def load_model(method: QuantMethod, request: LoadRequest) -> PreTrainedModel:
    """Build one model with `method` and refuse it if parts of it ended up offloaded or on meta."""
    model = method.recipe(request)
    model.eval()
    precision = precision_info(model, method.compute_dtype(request))
    if precision.offloaded and not request.allow_offload:
        raise QuantcheckError(
            f"{method.name}: parts of the model are on {', '.join(precision.devices)} instead of {request.device} "
            "(offloaded: every cost figure would be wrong); "
            "use a bigger device, or pass --allow-offload to measure it anyway"
        )
    return model


def precision_info(model: PreTrainedModel, compute_dtype: str) -> PrecisionInfo:
    """Record what the model really holds: parameter dtypes and devices, and whether it is offloaded."""
    dtypes: dict[str, int] = {}
    devices: set[str] = set()
    for parameter in model.parameters():
        name = str(parameter.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + parameter.numel()
        devices.add(parameter.device.type)
    device_map = getattr(model, "hf_device_map", None) or {}
    mapped = {str(place) for place in device_map.values()}
    offloaded = "meta" in devices or bool(mapped & {"cpu", "disk"}) and len(mapped) > 1
    return PrecisionInfo(
        parameter_dtypes=dtypes, devices=sorted(devices | mapped), compute_dtype=compute_dtype, offloaded=offloaded
    )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class DecoderStack:
    """A causal LM's decoder layers, final norm and output head, with the name the model gives its layers' list."""

    prefix: str  # "model.layers": layer i is the module `f"{prefix}.{i}"`
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head: torch.nn.Module

    def name(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def decoder_stack(model: PreTrainedModel) -> DecoderStack:
    """Where the decoder layers are: `get_decoder().layers` and `.norm`, as in Llama, Mistral, Qwen, Gemma and
    SmolLM; another layout is refused in one line."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    head = model.get_output_embeddings()
    if layers is None or norm is None or head is None:
        raise QuantcheckError(
            f"{type(model).__name__} keeps its decoder layers elsewhere than get_decoder().layers and .norm: "
            "per-layer sensitivity and keep= need a Llama-style layout"
        )
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return DecoderStack(prefix, layers, norm, head)


def decoder_layer_count(folder: Path) -> int:
    """The number of decoder layers, read from config.json (no torch): what keep= indices are checked against."""
    config = json.loads((Path(folder) / "config.json").read_text())
    count = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    if not isinstance(count, int):
        raise QuantcheckError(f"{folder}/config.json gives no num_hidden_layers: its decoder layers cannot be named")
    return count


def kept_modules(path: str, keep: tuple[int, ...], trust_remote_code: bool = False) -> tuple[str, ...]:
    """The modules a mixed-precision variant leaves at the reference's precision, by the model's own names: the output
    head (naming any module replaces transformers' default skip of it) and the kept decoder layers. Read from the
    architecture built on the meta device, so nothing is loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    stack = decoder_stack(model)
    head = next(name for name, module in model.named_modules() if module is stack.head)
    return (head, *(stack.name(index) for index in sorted(keep)))
