"""Raw next-token differences between the reference and a variant at the same position.

All functions take log-probabilities over the full vocabulary (batched: [items, vocab]) and work
in float64, because per-item KL of good quantizations is ~1e-3 and float32 sums over 50k-150k
entries lose that.
"""

from __future__ import annotations

import torch

TOP_K = (1, 2, 3, 5, 10, 20)


def kl_divergence(reference_logprobs: torch.Tensor, variant_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || variant) per row, in nats: sum p_ref * (log p_ref - log p_var)."""
    ref = reference_logprobs.double()
    var = variant_logprobs.double()
    p_ref = ref.exp()
    # Where p_ref == 0 the term is 0 by convention, even if the variant puts -inf there.
    terms = torch.where(p_ref > 0, p_ref * (ref - var), torch.zeros_like(ref))
    return terms.sum(dim=-1).clamp_min(0.0)


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
    values = logprobs.double()
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
