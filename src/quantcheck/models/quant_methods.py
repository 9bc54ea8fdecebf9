"""The one registry of quantization methods: a name maps to a recipe and the devices it runs on.

Adding a method is one `_register(QuantMethod(...))` entry. A recipe receives the reference's
folder and precision and returns the quantized model; `load_model` wraps it with the guards
(offload, meta tensors) that apply to every method alike.

A method that can leave modules out also says how (`QuantMethod.serve`): its recipe honours `LoadRequest.keep`, which
makes a mixed-precision variant (`bnb-nf4?keep=0,1,29`: those decoder layers at the reference's precision).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantcheck.errors import QuantMethodError
from quantcheck.models.plan import CAST_16, Footprint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def importable(module: str) -> bool:
    """Whether `module` can be imported here, without importing it.

    find_spec of a dotted name imports its parent: `optimum.quanto` without `optimum` raises rather than
    answering None, which is "not installed" all the same.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class LoadRequest:
    """What a recipe needs to build one model: where the weights are and how to place them."""

    path: str
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # the reference precision (also the compute dtype unless a method says otherwise)
    trust_remote_code: bool = False
    allow_offload: bool = False
    device_memory_bytes: int | None = None
    """With `allow_offload`: what the device may hold (--max-memory-gb); accelerate offloads the rest, to CPU memory
    from a GPU and to `offload_folder` on disk from the CPU, as a model larger than its device would be."""
    offload_folder: str | None = None
    allow_pickle: bool = False
    keep: tuple[str, ...] = ()
    """Modules left at the reference's precision, by the model's own names (`loading.kept_modules`): the kept decoder
    layers and the output head. Empty: the method's own default."""

    def from_pretrained_kwargs(self, **extra: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            # One device for the whole model: "auto" would silently offload layers to CPU or disk.
            "device_map": "auto" if self.allow_offload else {"": self.device},
            "trust_remote_code": self.trust_remote_code,
            "use_safetensors": None if self.allow_pickle else True,
        }
        if self.allow_offload and self.device_memory_bytes is not None:
            # accelerate's keys: a GPU by index, then the host; from the CPU the rest can only go to disk.
            kwargs["max_memory"] = (
                {"cpu": self.device_memory_bytes}
                if self.device == "cpu"
                else {0: self.device_memory_bytes, "cpu": _host_memory_bytes()}
            )
        if self.allow_offload and self.offload_folder:
            kwargs["offload_folder"] = self.offload_folder  # what neither the device nor the host holds
        if self.device == "cpu":
            # A memory-mapped file stays resident while any tensor views it (a quantized model's float
            # embeddings do), which would bill the whole fp32 file to the variant's memory.
            kwargs["disable_mmap"] = True
        kwargs.update(extra)
        return kwargs


def _host_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


Recipe = Callable[[LoadRequest], "PreTrainedModel"]
Serve = Callable[[LoadRequest], str]
MIXED_OPTION = "keep"


@dataclass(frozen=True)
class QuantMethod:
    """One registered way of building a variant of the reference model."""

    name: str
    description: str
    devices: frozenset[str]
    requires: tuple[str, ...]  # importable module names
    install: str  # what to pip install when a requirement is missing
    recipe: Recipe = field(repr=False)
    compute_dtype: Callable[[LoadRequest], str] = field(repr=False, default=lambda req: _dtype_name(req.dtype))
    serve: Serve | None = field(repr=False, default=None)
    """The call a user loads this method with, `LoadRequest.keep` included, as code; None: the method quantizes the
    whole model and cannot leave modules out (a cast)."""
    footprint: Footprint | None = None
    """How it stores the weights, for the plan made before loading (`models.plan`)."""

    def check_keeps(self) -> None:
        """Refuse, in one line, a per-layer question to a method that cannot leave a layer out."""
        if self.serve is None:
            able = ", ".join(name for name, method in REGISTRY.items() if method.serve is not None)
            raise QuantMethodError(
                f"{self.name} cannot leave layers out (it converts the whole model), so it has no per-layer "
                f"sensitivity or {MIXED_OPTION}=: choose one of {able}"
            )

    def missing_requirements(self) -> list[str]:
        return [module for module in self.requires if not importable(module)]

    def check_runnable(self, device: str) -> None:
        """Refuse before any model loads: wrong device or library not installed."""
        if device not in self.devices:
            raise QuantMethodError(
                f"{self.name} does not run on {device} (runs on: {', '.join(sorted(self.devices))}); "
                f"choose another --quant or --device"
            )
        if missing := self.missing_requirements():
            raise QuantMethodError(
                f"{self.name} needs {', '.join(missing)} which is not installed: run `pip install {self.install}`"
            )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _from_pretrained(request: LoadRequest, **extra: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(request.path, **request.from_pretrained_kwargs(**extra))


def _reference(request: LoadRequest) -> PreTrainedModel:
    return _from_pretrained(request)


def _cast(dtype_name: str) -> Recipe:
    def recipe(request: LoadRequest) -> PreTrainedModel:
        import torch

        return _from_pretrained(request, dtype=getattr(torch, dtype_name))

    return recipe


def _bnb_compute_dtype(request: LoadRequest) -> torch.dtype:
    """bf16 compute on CUDA (the original experiment's setting); the reference dtype on CPU."""
    import torch

    return torch.bfloat16 if request.device == "cuda" else request.dtype


def _call(name: str, first: str | None, arguments: dict[str, Any]) -> str:
    """`name(first, key=value, ...)` as code: the arguments' reprs are what a user types (torch.float32, lists)."""
    return f"{name}({', '.join([*([first] if first else []), *(f'{k}={v!r}' for k, v in arguments.items())])})"


def _skip(request: LoadRequest, key: str) -> dict[str, list[str]]:
    """transformers' option naming the modules to leave out; naming any replaces its default (the output head), which
    `LoadRequest.keep` therefore lists too."""
    return {key: list(request.keep)} if request.keep else {}


def _bnb_4bit_arguments(quant_type: str, double_quant: bool) -> Callable[[LoadRequest], dict[str, Any]]:
    def arguments(request: LoadRequest) -> dict[str, Any]:
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": _bnb_compute_dtype(request),
            **_skip(request, "llm_int8_skip_modules"),
        }

    return arguments


def _bnb_int8_arguments(request: LoadRequest) -> dict[str, Any]:
    return {"load_in_8bit": True, **_skip(request, "llm_int8_skip_modules")}


def _bnb(arguments: Callable[[LoadRequest], dict[str, Any]]) -> tuple[Recipe, Serve]:
    def recipe(request: LoadRequest) -> PreTrainedModel:
        from transformers import BitsAndBytesConfig

        return _from_pretrained(request, quantization_config=BitsAndBytesConfig(**arguments(request)))

    return recipe, lambda request: _call("BitsAndBytesConfig", None, arguments(request))


def _torchao_int8_weight_only(request: LoadRequest) -> PreTrainedModel:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig(), **_skip(request, "modules_to_not_convert"))
    return _from_pretrained(request, quantization_config=config)


def _torchao_serve(request: LoadRequest) -> str:
    return _call("TorchAoConfig", "Int8WeightOnlyConfig()", _skip(request, "modules_to_not_convert"))


def _quanto(weights: str) -> tuple[Recipe, Serve]:
    def arguments(request: LoadRequest) -> dict[str, Any]:
        return {"weights": weights, **_skip(request, "modules_to_not_convert")}

    def recipe(request: LoadRequest) -> PreTrainedModel:
        from transformers import QuantoConfig

        return _from_pretrained(request, quantization_config=QuantoConfig(**arguments(request)))

    return recipe, lambda request: _call("QuantoConfig", None, arguments(request))


def _hqq(nbits: int) -> tuple[Recipe, Serve]:
    """HQQ through its own API: transformers' HqqConfig raises NotImplementedError in 5.x. Its per-module switch is
    the list of modules it leaves alone (`get_ignore_layers`): the kept layers' Linear modules join it."""

    def recipe(request: LoadRequest) -> PreTrainedModel:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        class Keeping(AutoHQQHFModel):
            @classmethod
            def get_ignore_layers(cls, model) -> list[str]:
                kept = [name for name, _ in model.named_modules() if _inside(name, request.keep)]
                return [*super().get_ignore_layers(model), *kept]

        model = _from_pretrained(request)
        Keeping.quantize_model(
            model,
            quant_config=BaseQuantizeConfig(nbits=nbits, group_size=64),
            compute_dtype=request.dtype,
            device=request.device,
        )
        # HQQ turns requires_grad off everywhere, and torch's CPU matmul takes another kernel for such weights (3e-5
        # apart on the head): the kept modules get the flag back, so they compute as the reference's do.
        for name, parameter in model.named_parameters(remove_duplicate=False):  # a tied head is listed too
            parameter.requires_grad_(parameter.requires_grad or _inside(name.rpartition(".")[0], request.keep))
        return model

    def serve(request: LoadRequest) -> str:
        call = (
            f"AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits={nbits}, group_size=64), "
            f"compute_dtype={request.dtype!r}, device={request.device!r})"
        )
        kept = f", from a subclass whose get_ignore_layers adds every module inside {list(request.keep)}"
        return call + (kept if request.keep else "")

    return recipe, serve


def _inside(name: str, modules: tuple[str, ...]) -> bool:
    """`name` is one of `modules` or inside one: 'model.layers.1.mlp' is inside 'model.layers.1', not '...layers.11'."""
    return any(name == module or name.startswith(module + ".") for module in modules)


REGISTRY: dict[str, QuantMethod] = {}

_BOTH = frozenset({"cpu", "cuda"})


def _register(method: QuantMethod) -> None:
    REGISTRY[method.name] = method


_register(
    QuantMethod(
        "none",
        "the reference itself again: a sanity check (expect identical outputs)",
        _BOTH,
        (),
        "",
        _reference,
        footprint=Footprint(bits=0),
    )
)
for _name, _dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
    _register(
        QuantMethod(
            _name,
            f"plain cast to {_dtype}",
            _BOTH,
            (),
            "",
            _cast(_dtype),
            lambda r, dtype=_dtype: dtype,
            footprint=CAST_16,
        )
    )
_bnb_compute_name = lambda r: _dtype_name(_bnb_compute_dtype(r))  # noqa: E731
# 4-bit codes and an absmax per 64 weights: bfloat16 on CPU (bitsandbytes' CPU kernel repacks it; float32 on CUDA,
# 0.25 bit a weight more), with double quantization one byte and a float32 scale per 256 absmax values.
for _name, _kind, _dq, _text in [
    ("bnb-nf4", "nf4", False, "bitsandbytes 4-bit NormalFloat"),
    (
        "bnb-nf4-dq",
        "nf4",
        True,
        "bitsandbytes NF4 + double quantization, bf16 compute on CUDA (the original experiment)",
    ),
    ("bnb-fp4", "fp4", False, "bitsandbytes 4-bit float"),
]:
    _recipe, _serve = _bnb(_bnb_4bit_arguments(_kind, _dq))
    _footprint = Footprint(bits=4, group=64, group_bytes=1 + 4 / 256 if _dq else 2)
    _register(
        QuantMethod(
            _name,
            _text,
            _BOTH,
            ("bitsandbytes",),
            "'quantcheck[bnb]'",
            _recipe,
            _bnb_compute_name,
            _serve,
            footprint=_footprint,
        )
    )
_recipe, _serve = _bnb(_bnb_int8_arguments)
_register(
    QuantMethod(
        "bnb-int8",
        "bitsandbytes LLM.int8() 8-bit weights",
        _BOTH,
        ("bitsandbytes",),
        "'quantcheck[bnb]'",
        _recipe,
        serve=_serve,
        footprint=Footprint(bits=8, row_bytes=4),
    )
)
_register(
    QuantMethod(
        "torchao-int8wo",
        "torchao int8 weight-only",
        _BOTH,
        ("torchao",),
        "'quantcheck[torchao]'",
        _torchao_int8_weight_only,
        serve=_torchao_serve,
        footprint=Footprint(bits=8, row_bytes=4),
    )
)
for _name, _weights, _text, _footprint in [
    ("quanto-int8", "int8", "optimum-quanto int8 weights", Footprint(bits=8, row_bytes=4)),
    ("quanto-int4", "int4", "optimum-quanto int4 weights", Footprint(bits=4, group=128, group_bytes=8)),
    ("quanto-fp8", "float8", "optimum-quanto float8 weights", Footprint(bits=8, row_bytes=4)),
]:
    _recipe, _serve = _quanto(_weights)
    _register(
        QuantMethod(
            _name,
            _text,
            _BOTH,
            ("optimum.quanto",),
            "'quantcheck[quanto]'",
            _recipe,
            serve=_serve,
            footprint=_footprint,
        )
    )
for _bits in (4, 8):
    _recipe, _serve = _hqq(_bits)
    _register(
        QuantMethod(
            f"hqq-{_bits}bit",
            f"HQQ {_bits}-bit, group size 64, no calibration",
            _BOTH,
            ("hqq",),
            "'quantcheck[hqq]'",
            _recipe,
            serve=_serve,
            footprint=Footprint(bits=_bits, group=64, group_bytes=8),
        )
    )


def get_method(name: str) -> QuantMethod:
    """Look a transformers recipe up by name; an unknown name lists the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise QuantMethodError(
            f"unknown quantization method {name!r}; valid: {', '.join(REGISTRY)}, or pretrained:<folder or hub id>"
        ) from None


def mixed_method(method: str, keep: tuple[int, ...]) -> str:
    """A mixed-precision variant's spelling in the variant grammar: `bnb-nf4?keep=0,1,29` (no layer kept: `method`)."""
    return f"{method}?{MIXED_OPTION}={','.join(str(index) for index in sorted(keep))}" if keep else method


def split_mixed(method: str) -> tuple[str, tuple[int, ...]]:
    """`mixed_method` read back: the registered method and the kept decoder layers' indices."""
    name, _, kept = method.partition(f"?{MIXED_OPTION}=")
    return name, tuple(int(index) for index in kept.split(",")) if kept else ()


def parse_keep(text: str, layers: int) -> tuple[int, ...]:
    """keep=0,1,29 as sorted distinct indices, each an integer below the model's `layers`; anything else is one line."""
    parts = text.split(",")
    if not all(part.strip().isdigit() for part in parts):
        raise QuantMethodError(
            f"{MIXED_OPTION}={text}: give decoder layer indices as whole numbers joined by ',' (keep=0,1,29)"
        )
    keep = tuple(sorted({int(part) for part in parts}))
    if keep[-1] >= layers:
        raise QuantMethodError(
            f"{MIXED_OPTION}={text}: layer {keep[-1]} does not exist; the model's decoder layers are 0..{layers - 1}"
        )
    return keep
