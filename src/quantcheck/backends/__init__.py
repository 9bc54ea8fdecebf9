"""Backends registered by name (lm-eval style): `hf` (transformers), `vllm`, `llamacpp`, `openai` (a model behind an
OpenAI-compatible server), and `kldfile` (a reference read from a llama-perplexity base file).

Adding an engine is one module here with a `Backend` subclass, and one line in `_MODULES`.
Modules are imported on first use, so the parent process never imports an engine it does not run.
"""

from __future__ import annotations

import importlib

from pydantic import BaseModel

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.errors import QuantMethodError

_MODULES = {
    "hf": "quantcheck.backends.hf",
    "vllm": "quantcheck.backends.vllm",
    "llamacpp": "quantcheck.backends.llamacpp",
    "openai": "quantcheck.backends.openai.backend",
    "kldfile": "quantcheck.backends.kldfile",
}
DEFAULT_BACKEND = "hf"
BACKEND_NAMES = tuple(_MODULES)
# What users write before a variant when it is not the backend's name: `--quant gguf:Q4_K_M` runs in llama.cpp,
# `--quant url:http://...` behind a server.
PREFIXES = {"gguf": "llamacpp", "url": "openai"}


def quant_prefix(backend: str) -> str:
    """How a backend's variants are written and named: '' (hf), 'vllm:', 'gguf:'."""
    if backend == DEFAULT_BACKEND:
        return ""
    return next((prefix for prefix, name in PREFIXES.items() if name == backend), backend) + ":"


def settings_models() -> dict[str, type[BaseModel]]:
    """Each engine's settings model (`Backend.settings_model`) by backend name, for the engines that have one."""
    models = {name: get_backend(name).settings_model for name in BACKEND_NAMES}
    return {name: model for name, model in models.items() if model}


def engine_defaults() -> dict[str, dict[str, object]]:
    """Every engine's settings at their defaults, by backend name (a run that sets none records these)."""
    return {name: model().model_dump() for name, model in settings_models().items()}


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name`; an unknown name lists the valid ones."""
    if name not in _MODULES:
        raise QuantMethodError(f"unknown backend {name!r}; valid: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_BACKEND",
    "PREFIXES",
    "Backend",
    "MethodInfo",
    "engine_defaults",
    "get_backend",
    "quant_prefix",
    "settings_models",
]
