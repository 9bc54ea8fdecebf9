"""Per-question metrics at the answer position, each declared once here: what it is, its unit, which way is better
and how it is computed from the reference's and the variant's records of one question.

A declaration flows without an edit elsewhere into results.json (`ModelResult.item_metrics`: the mean over questions
with a bootstrap interval), metrics.csv (NAME, NAME_ci_low, NAME_ci_high) and the report's accuracy table (HTML and
Markdown). They inform: the verdict judges KL, top-1 and accuracy (`analysis/verdict.py`), each with its own limit
and noise floor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from quantcheck.schema.results import ItemRecord

Unit = Literal["points", "nats", "number"]


@dataclass(frozen=True)
class ItemMetric:
    name: str
    """results.json's key and metrics.csv's column."""
    column: str
    """The report's column header."""
    description: str
    unit: Unit
    higher_is_better: bool
    compute: Callable[[ItemRecord, ItemRecord], float | None]
    """(reference's record, variant's record) -> the value on that question; None where it cannot be known."""


def correct_answer_delta_p(reference: ItemRecord, variant: ItemRecord) -> float | None:
    """p(variant) - p(reference) of the correct answer's letter at the answer position, over the full vocabulary:
    the probability the variant gained or lost on what it should say. None where a row was only a server's top K
    (an unlisted letter's probability is only bounded there)."""
    if reference.loglik is None or variant.loglik is None or variant.kl_bound is not None:
        return None
    correct = ord(reference.answer) - ord("A")
    return math.exp(variant.loglik.choice_logprobs[correct]) - math.exp(reference.loglik.choice_logprobs[correct])


ITEM_METRICS: tuple[ItemMetric, ...] = (
    ItemMetric(
        name="answer_delta_p",
        column="\u0394p of the correct answer [95% CI]",
        description="mean p(variant) - p(reference) of the correct answer's letter at the answer position",
        unit="points",
        higher_is_better=True,
        compute=correct_answer_delta_p,
    ),
)
