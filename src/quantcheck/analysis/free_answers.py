"""What a variant says on its own (a prompts run): its greedy answers against the reference's, token by token.

Teacher forcing (the corpus statistics) scores the variant on the reference's own path; here the variant walks
its own, so one early different token shows as a different answer even where the per-token KL is small
(GPTQModel's diagnostics call it the greedy-trajectory divergence). Both answers come from the same chat
prompts, greedy decoding and stop tokens, cut before the first stop token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantcheck.schema.results import AnswerRecord, DivergentAnswer, FreeAnswers
from quantcheck.stats.intervals import proportion

SHOWN = 3
"""Most divergent answers kept for the report: the earliest divergences."""
EARLY = 0.5
"""An answer that stops at under this share of the reference's length "stops much earlier"."""
BY_TOKEN = 16
"""`divergence_by_token` counts answer tokens 0..BY_TOKEN-1 one by one and the rest together."""


def first_divergence(reference: Sequence[int], variant: Sequence[int]) -> int | None:
    """The first answer token where the two differ (a longer answer differs where the shorter one ended); None if
    they are identical."""
    for index, (ours, theirs) in enumerate(zip(reference, variant)):
        if ours != theirs:
            return index
    return None if len(reference) == len(variant) else min(len(reference), len(variant))


def free_answers(
    reference: Sequence[Sequence[int]],
    reference_pieces: Sequence[Sequence[str]],
    variant: Sequence[AnswerRecord],
    max_new_tokens: int,
    names: Sequence[str],
) -> FreeAnswers:
    """Compare each prompt's two greedy answers; the pieces (each token's text) make the side-by-side answers."""
    divergences = [first_divergence(ours, theirs.ids) for ours, theirs in zip(reference, variant)]
    diverged = [index for index, point in enumerate(divergences) if point is not None]
    points = np.array([divergences[index] for index in diverged], dtype=int)
    spread = (
        dict(zip(("median", "p25", "p75"), np.percentile(points, [50, 25, 75]).tolist()))
        | {"min": float(points.min()), "max": float(points.max())}
        if len(points)
        else {}
    )
    reference_tokens = sum(len(answer) for answer in reference)
    shown = sorted(diverged, key=lambda index: (divergences[index], index))[:SHOWN]
    return FreeAnswers(
        n=len(reference),
        max_new_tokens=max_new_tokens,
        identical=proportion([point is None for point in divergences]),
        diverged=len(diverged),
        first_divergence=spread,
        divergence_by_token=np.bincount(np.minimum(points, BY_TOKEN), minlength=BY_TOKEN + 1).tolist()
        if len(points)
        else [],
        length_ratio=sum(len(answer.ids) for answer in variant) / reference_tokens if reference_tokens else None,
        no_stop=sum(len(answer.ids) >= max_new_tokens for answer in variant),
        reference_no_stop=sum(len(answer) >= max_new_tokens for answer in reference),
        early_stop=sum(
            len(theirs.ids) < EARLY * len(ours) and len(theirs.ids) < max_new_tokens
            for ours, theirs in zip(reference, variant)
        ),
        most_divergent=[
            DivergentAnswer(
                prompt=index,
                name=names[index],
                diverges_at=divergences[index],
                shared="".join(reference_pieces[index][: divergences[index]]),
                reference_rest="".join(reference_pieces[index][divergences[index] :]),
                variant_rest="".join(variant[index].pieces[divergences[index] :]),
            )
            for index in shown
        ],
    )
