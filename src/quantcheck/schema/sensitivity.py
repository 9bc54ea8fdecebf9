"""sensitivity.json: which decoder layers make a quantized variant diverge, and the mixed-precision variants proposed
from that ranking and then measured as ordinary variants of the same run (`quantcheck sensitivity`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from quantcheck.schema.results import Estimate

SENSITIVITY_VERSION = 2
"""2: `outside`, the tensors beyond the decoder blocks that the method quantizes (GGUF's token embeddings, its output
head), each quantized alone; a version 1 table reads with it empty."""


class LayerSensitivity(BaseModel):
    """The model with only this layer quantized, against the reference on the same token ids (exact full rows)."""

    index: int = Field(description="the decoder layer's index; -1 for a tensor outside the blocks (`outside`)")
    name: str = Field(description="the module's name in the model, e.g. model.layers.7, or the GGUF tensor's")
    kl: Estimate = Field(description="mean KL(reference || only this layer quantized) per item, nats, with interval")
    top1_agreement: float = Field(description="fraction of items whose most likely next token is the reference's")
    answer_flips: int = Field(description="items whose log-likelihood answer differs from the reference's")


class Proposal(BaseModel):
    """A set of layers to keep at the reference's precision, predicted from the ranking, then measured."""

    keep: list[int] = Field(description="decoder layer indices kept at the reference's precision")
    variant: str = Field(description="its spelling in the variant grammar, e.g. bnb-nf4?keep=0,1,29")
    rule: str = Field(description="how the set was chosen")
    predicted_kl: float = Field(
        description="sum of the per-layer mean KL of the layers still quantized (and of `outside`), nats"
    )
    serve: str = Field(description="the quantization config that loads it, as code")
    measured_kl: Estimate | None = Field(None, description="its mean KL measured as an ordinary variant of the run")
    kl_check: str | None = Field(None, description="the verdict's mean-KL check: pass, fail or unclear")
    decision: str | None = Field(None, description="the variant's verdict")
    within_max_kl: bool | None = Field(None, description="measured mean KL <= max_kl: no further layer is kept")


class SensitivityTable(BaseModel):
    """Per-layer sensitivity of one method on one model and data set, ranked, with the proposals."""

    kind: Literal["quantcheck-sensitivity"] = "quantcheck-sensitivity"
    version: int = SENSITIVITY_VERSION
    model: str
    method: str
    dataset: str
    items: int
    run_dir: str = Field(description="the run folder whose results.json holds the measured variants")
    max_kl: float
    seconds: float = Field(description="wall time of the per-layer scoring, model loads excluded")
    layers: list[LayerSensitivity] = Field(description="every decoder layer, highest mean KL first")
    outside: list[LayerSensitivity] = Field(
        default=[],
        description="tensors outside the decoder blocks that the method quantizes (GGUF: token_embd, which a tied "
        "model also reads as its output head; output), each quantized alone; informative, not kept by a proposal "
        "(keep= names decoder blocks); their KL counts in predicted_variant_kl and in every proposal's prediction",
    )
    predicted_variant_kl: float = Field(
        description="sum of every layer's mean KL (and `outside`'s): the whole variant, if additive"
    )
    measured_variant_kl: Estimate | None = Field(None, description="the whole variant's mean KL, measured in the run")
    proposals: list[Proposal] = Field(default=[], description="in the order measured; each keeps one layer more")
