"""Backends registered by name (lm-eval style): `hf` (transformers) and `vllm`.

Adding an engine is one module here with a `Backend` subclass, and one line in `_MODULES`.
Modules are imported on first use, so the parent process never imports an engine it does not run.
"""

from __future__ import annotations

import importlib

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.errors import QuantMethodError

_MODULES = {"hf": "quantcheck.backends.hf", "vllm": "quantcheck.backends.vllm"}
DEFAULT_BACKEND = "hf"
BACKEND_NAMES = tuple(_MODULES)


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as `name`; an unknown name lists the valid ones."""
    if name not in _MODULES:
        raise QuantMethodError(f"unknown backend {name!r}; valid: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).BACKEND


__all__ = ["BACKEND_NAMES", "DEFAULT_BACKEND", "Backend", "MethodInfo", "get_backend"]
