"""What a variant's weights will take, planned from the model's config.json alone (no weights loaded): every number
here is an estimate, and named so wherever it is shown; the run then measures the real one beside it.

A method's footprint says how it stores a Linear layer's weight matrix (bits per weight, a scale per output row, a
scale per group) and whether it quantizes the embeddings and the output head; everything else (norms, the rotary
buffer, biases) stays at the reference's precision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantcheck.errors import ModelNotFoundError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Footprint:
    """How a method stores a weight matrix of `rows` outputs by `cols` inputs."""

    bits: float
    """Bits per weight of the codes (4 for NF4, 8 for int8); 0: the reference's own precision."""
    row_bytes: float = 0.0
    """Bytes per output row (one float32 scale per row: 4)."""
    group: int | None = None
    group_bytes: float = 0.0
    """Bytes per group of `group` weights along the input (scales, zero points, their own quantization)."""
    embeddings: bool = False
    """The input embeddings and (when not tied to them) the output head are quantized too (GGUF types)."""

    def describe(self) -> str:
        """How it stores a matrix, in words: "4-bit codes, 2 B per 64 weights"."""
        if not self.bits:
            return "the reference's precision"
        parts = [f"{self.bits:g}-bit weights"]
        if self.row_bytes:
            parts.append(f"{self.row_bytes:g} B per row")
        if self.group:
            parts.append(f"{self.group_bytes:.3g} B per {self.group} weights")
        parts.append("embeddings too" if self.embeddings else "embeddings kept")
        return ", ".join(parts)

    def matrix_bytes(self, rows: int, cols: int, dtype_bytes: int) -> float:
        codes = rows * cols * (self.bits / 8 if self.bits else dtype_bytes)
        groups = rows * cols / self.group if self.group else 0
        return codes + rows * self.row_bytes + groups * self.group_bytes


@dataclass(frozen=True)
class ModelShape:
    """The parameter counts that decide weight memory, read from a decoder-only transformer's config.json."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """Llama-like configs (Llama, Mistral, Qwen2, SmolLM, Phi-3, Gemma): their names for the same shapes."""
        text = config.get("text_config", config)
        try:
            hidden, heads = text["hidden_size"], text["num_attention_heads"]
            return cls(
                layers=text["num_hidden_layers"],
                hidden=hidden,
                intermediate=text["intermediate_size"],
                vocab=text["vocab_size"],
                heads=heads,
                kv_heads=text.get("num_key_value_heads") or heads,
                head_dim=text.get("head_dim") or hidden // heads,
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            )
        except KeyError as missing:
            raise ModelNotFoundError(
                f"config.json has no {missing}: quantcheck plans decoder-only transformers (Llama-like configs); "
                "run without a plan, or report the architecture"
            ) from None

    @classmethod
    def from_folder(cls, folder: Path) -> ModelShape:
        path = folder / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelNotFoundError(f"cannot read {path}: {error}; a model folder needs its config.json") from None

    def linear_shapes(self, layers: int | None = None) -> list[tuple[int, int]]:
        """(rows, cols) of every decoder Linear weight of `layers` layers (all): attention q, k, v, o, the gated MLP."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = [
            (q, self.hidden),
            (kv, self.hidden),
            (kv, self.hidden),
            (self.hidden, q),
            (self.intermediate, self.hidden),
            (self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]
        return per_layer * (self.layers if layers is None else layers)

    def other_parameters(self) -> int:
        """Norms (two a layer and a final one) and the rotary buffer, kept at the reference's precision."""
        return (2 * self.layers + 1) * self.hidden + self.head_dim // 2

    def weight_bytes(self, footprint: Footprint | None, dtype_bytes: int, kept_layers: int = 0) -> int:
        """The planned weight bytes of the model stored by `footprint` (None: unquantized, at `dtype_bytes`), with
        `kept_layers` decoder layers left at the reference's precision (a mixed-precision variant)."""
        plain = footprint or Footprint(bits=0)
        quantized = self.linear_shapes(self.layers - kept_layers)
        linear = sum(plain.matrix_bytes(rows, cols, dtype_bytes) for rows, cols in quantized)
        linear += sum(rows * cols * dtype_bytes for rows, cols in self.linear_shapes(kept_layers))
        heads = 1 if self.tied else 2
        stored = plain if plain.embeddings else Footprint(bits=0)
        embedding = stored.matrix_bytes(self.vocab, self.hidden, dtype_bytes)
        return round(linear + heads * embedding + self.other_parameters() * dtype_bytes)


def read_config(folder: Path) -> dict | None:
    """A model folder's config.json, or None where there is none to read (a hub id not fetched, a GGUF file)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def checkpoint_footprint(config: dict) -> Footprint | None:
    """A pre-quantized checkpoint's footprint from its config.json's `quantization_config` (AWQ, GPTQ: 4-bit codes, a
    16-bit scale and a packed zero point per group), or None when it has none or one this does not know."""
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method")
    if method in ("awq", "gptq"):
        bits, group = quantization.get("bits", 4), quantization.get("group_size", 128)
        zero_bytes = bits / 8 if quantization.get("zero_point", True) or method == "gptq" else 0
        if group in (None, -1):  # one group per row
            return Footprint(bits=bits, row_bytes=2 + zero_bytes)
        return Footprint(bits=bits, group=group, group_bytes=2 + zero_bytes)
    return None


CAST_16 = Footprint(bits=16, embeddings=True)
"""A cast to a 16-bit float: every matrix, the embeddings included, at two bytes a weight."""
