"""Raw next-token differences between the reference and a variant at the same position.

The functions take log-probabilities over the full vocabulary (batched: [items, vocab]), or for
the reference its compact rows (top K, tail mass, tail sample; `kl_from_top_k`), and work in
float64, because per-item KL of good quantizations is ~1e-3 and float32 sums over 50k-150k
entries lose that.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from quantcheck.schema.results import TOP_K


def kl_divergence(reference_logprobs: torch.Tensor, variant_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || variant) per row, in nats: sum p_ref * (log p_ref - log p_var)."""
    ref = reference_logprobs.double()
    var = variant_logprobs.double()
    p_ref = ref.exp()
    # Where p_ref == 0 the term is 0 by convention, even if the variant puts -inf there.
    terms = torch.where(p_ref > 0, p_ref * (ref - var), torch.zeros_like(ref))
    return terms.sum(dim=-1).clamp_min(0.0)


ROUNDING_ALLOWANCE = 1e-4
"""Probability mass by which the remainder `1 - sum(top-K probabilities)` of a float32 row may be off,
taken on the side that keeps the bound a lower bound. A float32 log-softmax row does not sum to 1:
SmolLM2's 49,152 entries sum to 1 + 1.1e-5 in transformers and in vLLM alike; ten times that
leaves room for larger vocabularies. It lowers the bound by about this much, far below any KL limit."""


def _remainder(logprobs: torch.Tensor, known: torch.Tensor, top: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass outside `known` per row, as (low, high): summed where the row is full, 1 - known mass
    (with the rounding allowance) where it holds only its top K."""
    probabilities = logprobs.exp()
    if top is None:
        rest = torch.where(known, torch.zeros_like(probabilities), probabilities).sum(dim=-1)
        return rest, rest
    rest = 1.0 - torch.where(known, probabilities, torch.zeros_like(probabilities)).sum(dim=-1)
    return (rest - ROUNDING_ALLOWANCE).clamp(0.0, 1.0), (rest + ROUNDING_ALLOWANCE).clamp(0.0, 1.0)


def kl_lower_bound(
    reference_logprobs: torch.Tensor, variant_logprobs: torch.Tensor, reference_top: int | None, variant_top: int | None
) -> torch.Tensor:
    """A lower bound on KL(reference || variant) per row when either side holds only its top K.

    `*_top` is None for a full row, K for a top-K row (-inf outside its K known entries). Tokens
    known on both sides contribute their exact terms; everything else is merged into one outcome
    (the data-processing inequality: KL of a coarsened pair <= KL), contributing
    P_rest * log(P_rest / Q_rest). A row's remainder is only known to within
    `ROUNDING_ALLOWANCE`, so the term is minimised over that box: the bound stays a lower bound.
    With both rows full it equals `kl_divergence`. No finite upper bound exists when the variant
    is the top-K side (its unlisted probabilities can be arbitrarily small).
    """
    if reference_top is None and variant_top is None:
        return kl_divergence(reference_logprobs, variant_logprobs)
    ref, var = reference_logprobs.double(), variant_logprobs.double()
    known = torch.ones_like(ref, dtype=torch.bool)
    for logprobs, top in ((ref, reference_top), (var, variant_top)):
        if top is not None:
            known &= torch.isfinite(logprobs)
    p_ref = ref.exp()
    terms = torch.where(known & (p_ref > 0), p_ref * (ref - var), torch.zeros_like(ref)).sum(dim=-1)
    p_low, p_high = _remainder(ref, known, reference_top)
    _, q_high = _remainder(var, known, variant_top)
    # P log(P/Q) falls as Q grows and, in P, is smallest at P = Q/e: the minimum over the box.
    p_rest = torch.minimum(torch.maximum(q_high / torch.e, p_low), p_high)
    rest = torch.where(
        p_rest > 0,
        p_rest * (p_rest.log() - q_high.clamp_min(torch.finfo(torch.float64).tiny).log()),
        torch.zeros_like(p_rest),
    )
    return (terms + rest).clamp_min(0.0)


def exact_top_k(reference_top: int | None, variant_top: int | None, ks: tuple[int, ...] = TOP_K) -> tuple[int, ...]:
    """The k of Jaccard@k that both rows determine exactly (all of them for full rows)."""
    limit = min(top for top in (reference_top, variant_top, max(ks)) if top is not None)
    return tuple(k for k in ks if k <= limit)


TIE_MARGIN = 32
"""Extra candidates taken past k, so that values tied with the k-th are all seen; a row with more
ties than this (a flat row) is sorted whole."""


def top_k_ids(logprobs: torch.Tensor, k: int = max(TOP_K)) -> torch.Tensor:
    """The k most likely token ids per row, most likely first; ties go to the lower token id.

    bf16 logits tie often, and torch.topk orders tied values as its kernel happens to, which
    differs between devices and versions: Jaccard@k and top-1 agreement would then depend on it.
    Only the top k + TIE_MARGIN candidates are sorted (by id, then stably by value), which keeps
    it as fast as topk on [batch, vocab] rows.
    """
    values = logprobs  # float32 rows: a float64 copy would order them the same, at twice the cost
    width = min(k + TIE_MARGIN, values.shape[-1])
    top_values, top_ids = torch.topk(values, width, dim=-1)
    overflow = top_values[..., -1] == top_values[..., k - 1]
    if width < values.shape[-1] and bool(overflow.any()):
        # ties may go on past the candidates: a stable sort of the whole row keeps them in id order
        row_values, row_ids = torch.sort(values[overflow], dim=-1, descending=True, stable=True)
        top_values[overflow], top_ids[overflow] = row_values[..., :width], row_ids[..., :width]
    by_id = torch.argsort(top_ids, dim=-1)
    top_values, top_ids = top_values.gather(-1, by_id), top_ids.gather(-1, by_id)
    by_value = torch.sort(top_values, dim=-1, descending=True, stable=True).indices
    return top_ids.gather(-1, by_value)[..., :k]


def jaccard_at_k(reference_top: list[int], variant_top: list[int], k: int) -> float:
    """|A ∩ B| / |A ∪ B| of the two top-k sets (1.0 when identical, 0.0 when disjoint)."""
    a, b = set(reference_top[:k]), set(variant_top[:k])
    return len(a & b) / len(a | b)


def jaccard_all_k(reference_top: list[int], variant_top: list[int], ks: tuple[int, ...] = TOP_K) -> dict[int, float]:
    return {k: jaccard_at_k(reference_top, variant_top, k) for k in ks}


# --- KL against a compact reference: its top K exactly, the rest as one mass and a sample ---------
#
# The reference keeps, per position, its K most likely tokens (ids and log-probabilities), the log of
# the probability mass R outside them, and S tail tokens drawn with probability proportional to p.
# The variant has its whole row q. With T the top K and p~ = p/R, q~ = q/Q on the tail (Q = q's mass
# outside T):
#   KL(p||q) = sum_T p log(p/q)  +  R log(R/Q)  +  R KL(p~||q~)
# The first term is exact. The second is the tail seen as one token; the third is >= 0 (log-sum
# inequality), so the first two are a lower bound. The third is estimated without bias from the
# samples: KL(p~||q~) = E_p~[d + exp(-d) - 1] with d = log(p~/q~), since E_p~[exp(-d)] = 1; each term
# is >= 0 and is ~d^2/2 for small d, so the sampling noise is second order (Schulman's "k3").
#
# Unbiased over many rows is not accurate on one row: per row the estimate's error has a standard
# error of its own (`KLBounds.se`, see `tail_kl_standard_error`), and a tail token the sample missed
# is invisible to it; only `lower` and `upper` are certain.


class KLBounds(NamedTuple):
    """Per row, in nats: the estimate, what it cannot fall below or exceed, and (compact store only;
    None otherwise) the estimate's own standard error on that row."""

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    se: torch.Tensor | None = None


def tail_log_mass(logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `top_ids` per row, as the logsumexp of the rest, returned in float64.

    Not log(1 - sum p_top): that cancels catastrophically when the top holds nearly all the mass.
    The logsumexp runs in the rows' own float32 (it subtracts the maximum first, so its relative error
    is about 1e-6, far below any KL that matters) because a float64 copy of every row costs more than
    the forward that made it; reference and variant go through the same call, so identical rows give
    identical masses.
    """
    return torch.logsumexp(logprobs.scatter(-1, top_ids, -math.inf), dim=-1).double()


def tail_samples(logprobs: torch.Tensor, top_ids: torch.Tensor, count: int, seeds: list[int]) -> torch.Tensor:
    """`count` token ids per row drawn from outside `top_ids` with probability proportional to p.

    Systematic sampling over the tail sorted by probability (one uniform offset per row, seeded by
    `seeds`, then evenly spaced points on the cumulative mass): each draw is marginally p~, so the
    mean over draws is unbiased, and the sorted order spreads the draws over all probability levels
    (less noise than independent draws). A token holding more than 1/count of the tail is drawn
    several times, as it should be.
    """
    rest = logprobs.double().scatter(-1, top_ids, -math.inf)
    values, order = torch.sort(rest, dim=-1, descending=True, stable=True)
    cumulative = torch.cumsum((values - values[..., :1]).exp(), dim=-1)
    offsets = torch.stack(
        [torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in seeds]
    )
    points = (offsets + torch.arange(count, dtype=torch.float64)) / count * cumulative[..., -1:]
    positions = torch.searchsorted(cumulative, points, right=True).clamp_max(rest.shape[-1] - top_ids.shape[-1] - 1)
    return order.gather(-1, positions)


def tail_kl_upper(
    variant_logprobs: torch.Tensor, top_ids: torch.Tensor, tail_mass: torch.Tensor, cap: torch.Tensor
) -> torch.Tensor:
    """The largest sum_tail p log(p/q) any reference tail could give: the worst case, certain but loose.

    All that is known of the reference's tail (the tokens outside `top_ids`) is that it sums to
    `tail_mass` R and that no entry exceeds `cap` (its K-th largest probability). p log(p/q) is
    convex in p, so its maximum over that polytope is at a vertex: m = floor(R/cap) tokens at the cap
    and the remainder on one more, and the largest such vertex puts them where the variant's q is
    smallest (only those m + 1 are sorted: a full sort made this 15x slower). A -inf in the variant's
    tail makes the bound infinite, as it is.
    """
    tail_size = variant_logprobs.shape[-1] - top_ids.shape[-1]
    full = torch.floor(tail_mass / cap).clamp_max(tail_size)
    count = full.long()
    needed = min(int(count.max()) + 1, tail_size)
    ascending = _smallest_outside(variant_logprobs, top_ids, needed).double()
    full_sum = torch.where(
        count > 0, torch.cumsum(ascending, dim=-1).gather(-1, (count - 1).clamp_min(0)[..., None]).squeeze(-1), 0.0
    )
    remainder = (tail_mass - full * cap).clamp_min(0.0)
    next_logprob = ascending.gather(-1, count.clamp_max(tail_size - 1)[..., None]).squeeze(-1)
    rest = torch.where(remainder > 0, remainder * (remainder.log() - next_logprob), 0.0)
    return full * cap * cap.log() - cap * full_sum + rest


def _smallest_outside(logprobs: torch.Tensor, top_ids: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` smallest values per row outside `top_ids`, ascending: the smallest count + K of the
    whole row with the top's entries pushed past them (no masked copy of every row)."""
    width = min(count + top_ids.shape[-1], logprobs.shape[-1])
    values, ids = torch.topk(logprobs, width, dim=-1, largest=False)
    in_top = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(-1, top_ids, True).gather(-1, ids)
    return torch.sort(torch.where(in_top, math.inf, values), dim=-1).values[..., :count]


def tail_kl_standard_error(d: torch.Tensor, tail_mass: torch.Tensor) -> torch.Tensor:
    """The standard error of R * mean(d + exp(-d) - 1) over a row's S tail samples, in nats.

    The spread of the S terms, R * sd / sqrt(S): the independent-draw formula, which if anything
    overstates the error of the systematic sample the store draws (it spreads the draws over the sorted
    tail). Added in quadrature, the sample's misfit beyond its own noise: exp(-d) = q~/p~ has mean
    exactly 1 over the whole tail and the estimate moves by exactly its sample mean's departure from 1
    (the estimate is mean(d) + mean(exp(-d)) - 1), so a departure of more than two of its own standard
    errors means the sample missed where the variant put its tail mass, where every drawn term is alike
    and their spread says nothing (constructed rows with a tail token the sample missed made 400 times
    likelier by the variant or more: the error exceeded 3 times the spread alone on 99 % of rows, 3 se
    on none). Where the variant *removes* mass from a tail token the sample missed, or makes one 55
    times likelier or less, neither part can see it: only the bounds hold there (`--store full` is
    exact). An infinite d (the variant gives a drawn token probability 0) gives an undefined se.
    """
    count = d.shape[-1]
    if count < 2:
        return torch.zeros_like(tail_mass)
    terms, ratios = d + torch.expm1(-d), torch.exp(-d)
    spread = terms.std(dim=-1, correction=1) / math.sqrt(count)
    misfit = ((ratios.mean(dim=-1) - 1.0).abs() - 2.0 * ratios.std(dim=-1, correction=1) / math.sqrt(count)).clamp_min(
        0.0
    )
    return torch.where(tail_mass > 0, tail_mass * torch.sqrt(spread**2 + misfit**2), 0.0)


def kl_from_top_k(
    top_ids: torch.Tensor,
    top_logprobs: torch.Tensor,
    log_tail_mass: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_logprobs: torch.Tensor,
    variant_logprobs: torch.Tensor,
) -> KLBounds:
    """KL(reference || variant) per row from the reference's compact rows and the variant's full rows.

    lower: top K exact + R log(R/Q) (the tail as one token; what top-K-only tools report). estimate:
    lower + R * the sampled KL(p~||q~), clamped to the bounds. upper: `tail_kl_upper`. All three are
    clamped at 0 like `kl_divergence` (float32 rows do not sum to exactly 1). se: the estimate's
    standard error on this row (`tail_kl_standard_error`).
    """
    reference_top = top_logprobs.double()
    exact = (reference_top.exp() * (reference_top - variant_logprobs.gather(-1, top_ids).double())).sum(dim=-1)
    tail_mass = log_tail_mass.exp()
    log_variant_tail = tail_log_mass(variant_logprobs, top_ids)
    has_tail = tail_mass > 0
    coarse = exact + torch.where(has_tail, tail_mass * (log_tail_mass - log_variant_tail), 0.0)
    d = (sample_logprobs.double() - log_tail_mass[..., None]) - (
        variant_logprobs.gather(-1, sample_ids).double() - log_variant_tail[..., None]
    )
    sampled = torch.where(has_tail, tail_mass * (d + torch.expm1(-d)).mean(dim=-1), 0.0)
    upper = exact + tail_kl_upper(variant_logprobs, top_ids, tail_mass, reference_top[..., -1].exp())
    lower, upper = coarse.clamp_min(0.0), upper.clamp_min(0.0)
    se = tail_kl_standard_error(d, tail_mass)
    return KLBounds(torch.minimum((coarse + sampled).clamp_min(0.0), upper), lower, upper, se)
