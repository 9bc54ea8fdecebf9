"""The KL lower bound from top-K rows: on the right side of the exact KL, tight where it can be, exact for full rows."""

import math

import pytest
import torch

from quantcheck.metrics.next_token import ROUNDING_ALLOWANCE, exact_top_k, kl_divergence, kl_lower_bound


def top_k_only(logprobs: torch.Tensor, k: int) -> torch.Tensor:
    """What a server capped at K returns: the K largest entries, -inf (unknown) elsewhere."""
    kept = torch.full_like(logprobs, -torch.inf)
    values, ids = torch.topk(logprobs, k, dim=-1)
    return kept.scatter(-1, ids, values)


def pairs(seed: int, rows: int = 64, vocab: int = 4000, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 4
    other = logits + torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * noise
    return torch.log_softmax(logits, -1).float(), torch.log_softmax(other, -1).float()


@pytest.mark.parametrize("reference_k, variant_k", [(None, 20), (20, None), (20, 20), (5, 20), (None, 5)])
@pytest.mark.parametrize("noise", [0.01, 0.5, 3.0])
def test_bound_never_exceeds_the_exact_kl(reference_k, variant_k, noise):
    reference, variant = pairs(seed=int(noise * 100), noise=noise)
    exact = kl_divergence(reference, variant)
    cut_reference = reference if reference_k is None else top_k_only(reference, reference_k)
    cut_variant = variant if variant_k is None else top_k_only(variant, variant_k)
    bound = kl_lower_bound(cut_reference, cut_variant, reference_k, variant_k)
    assert (bound <= exact).all(), (bound - exact).max()
    assert (bound >= 0).all()


def test_bound_is_informative_when_the_distributions_differ():
    """Top-20 of a 4000-token vocabulary: the bound catches most of a large KL."""
    reference, variant = pairs(seed=1, noise=3.0)
    exact = kl_divergence(reference, variant)
    bound = kl_lower_bound(reference, top_k_only(variant, 20), None, 20)
    assert bound.mean() > 0.5 * exact.mean(), (bound.mean(), exact.mean())


def test_bound_equals_kl_for_full_rows():
    reference, variant = pairs(seed=2)
    assert torch.equal(kl_lower_bound(reference, variant, None, None), kl_divergence(reference, variant))


def test_bound_hand_worked_three_tokens():
    """p = (.5, .3, .2), q = (.4, .4, .2); the variant lists only its top 1 (token 0 or 1, tied: token 0 here)."""
    p = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64))
    q_top1 = torch.tensor([[math.log(0.4), -math.inf, -math.inf]], dtype=torch.float64)
    # known: token 0; the rest merges: P_rest = 0.5 (summed from the full row), Q_rest = 0.6 + the rounding allowance
    expected = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / (0.6 + ROUNDING_ALLOWANCE))
    assert kl_lower_bound(p, q_top1, None, 1).item() == pytest.approx(expected, rel=1e-9)
    assert kl_lower_bound(p, q_top1, None, 1).item() <= kl_divergence(p, q).item()


def test_exact_jaccard_ks_stop_at_the_smallest_k():
    assert exact_top_k(None, None) == (1, 2, 3, 5, 10, 20)
    assert exact_top_k(None, 20) == (1, 2, 3, 5, 10, 20)
    assert exact_top_k(5, 20) == (1, 2, 3, 5)
    assert exact_top_k(None, 4) == (1, 2, 3)
