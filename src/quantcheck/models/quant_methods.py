"""The one registry of quantization methods: a name maps to a recipe and the devices it runs on.

Adding a method is one `_register(QuantMethod(...))` entry. A recipe receives the reference's
folder and precision and returns the quantized model; `load_model` wraps it with the guards
(offload, meta tensors) that apply to every method alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantcheck.errors import QuantMethodError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoadRequest:
    """What a recipe needs to build one model: where the weights are and how to place them."""

    path: str
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype  # the reference precision (also the compute dtype unless a method says otherwise)
    trust_remote_code: bool = False
    allow_offload: bool = False
    allow_pickle: bool = False

    def from_pretrained_kwargs(self, **extra: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            # One device for the whole model: "auto" would silently offload layers to CPU or disk.
            "device_map": "auto" if self.allow_offload else {"": self.device},
            "trust_remote_code": self.trust_remote_code,
            "use_safetensors": None if self.allow_pickle else True,
        }
        if self.device == "cpu":
            # A memory-mapped file stays resident while any tensor views it (a quantized model's float
            # embeddings do), which would bill the whole fp32 file to the variant's memory.
            kwargs["disable_mmap"] = True
        kwargs.update(extra)
        return kwargs


Recipe = Callable[[LoadRequest], "PreTrainedModel"]


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

    def missing_requirements(self) -> list[str]:
        return [module for module in self.requires if importlib.util.find_spec(module) is None]

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


def _bnb_4bit(quant_type: str, double_quant: bool) -> Recipe:
    def recipe(request: LoadRequest) -> PreTrainedModel:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=_bnb_compute_dtype(request),
        )
        return _from_pretrained(request, quantization_config=config)

    return recipe


def _bnb_int8(request: LoadRequest) -> PreTrainedModel:
    from transformers import BitsAndBytesConfig

    return _from_pretrained(request, quantization_config=BitsAndBytesConfig(load_in_8bit=True))


def _torchao_int8_weight_only(request: LoadRequest) -> PreTrainedModel:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return _from_pretrained(request, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def _quanto(weights: str) -> Recipe:
    def recipe(request: LoadRequest) -> PreTrainedModel:
        from transformers import QuantoConfig

        return _from_pretrained(request, quantization_config=QuantoConfig(weights=weights))

    return recipe


def _hqq(nbits: int) -> Recipe:
    """HQQ through its own API: transformers' HqqConfig raises NotImplementedError in 5.x."""

    def recipe(request: LoadRequest) -> PreTrainedModel:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        model = _from_pretrained(request)
        AutoHQQHFModel.quantize_model(
            model,
            quant_config=BaseQuantizeConfig(nbits=nbits, group_size=64),
            compute_dtype=request.dtype,
            device=request.device,
        )
        return model

    return recipe


REGISTRY: dict[str, QuantMethod] = {}

_BOTH = frozenset({"cpu", "cuda"})


def _register(method: QuantMethod) -> None:
    REGISTRY[method.name] = method


_register(
    QuantMethod(
        "none", "the reference itself again: a sanity check (expect identical outputs)", _BOTH, (), "", _reference
    )
)
_register(QuantMethod("bf16", "plain cast to bfloat16", _BOTH, (), "", _cast("bfloat16"), lambda r: "bfloat16"))
_register(QuantMethod("fp16", "plain cast to float16", _BOTH, (), "", _cast("float16"), lambda r: "float16"))
_bnb_compute_name = lambda r: _dtype_name(_bnb_compute_dtype(r))  # noqa: E731
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
    _register(
        QuantMethod(
            _name, _text, _BOTH, ("bitsandbytes",), "'quantcheck[bnb]'", _bnb_4bit(_kind, _dq), _bnb_compute_name
        )
    )
_register(
    QuantMethod(
        "bnb-int8", "bitsandbytes LLM.int8() 8-bit weights", _BOTH, ("bitsandbytes",), "'quantcheck[bnb]'", _bnb_int8
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
    )
)
for _weights in ("int8", "int4"):
    _register(
        QuantMethod(
            f"quanto-{_weights}",
            f"optimum-quanto {_weights} weights",
            _BOTH,
            ("optimum.quanto",),
            "'quantcheck[quanto]'",
            _quanto(_weights),
        )
    )
_register(
    QuantMethod(
        "quanto-fp8",
        "optimum-quanto float8 weights",
        _BOTH,
        ("optimum.quanto",),
        "'quantcheck[quanto]'",
        _quanto("float8"),
    )
)
for _bits in (4, 8):
    _register(
        QuantMethod(
            f"hqq-{_bits}bit",
            f"HQQ {_bits}-bit, group size 64, no calibration",
            _BOTH,
            ("hqq",),
            "'quantcheck[hqq]'",
            _hqq(_bits),
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
