"""KL against a compact reference row (top K, tail mass, tail sample) against the exact KL.

The rows are real log-softmax rows of random logits (no model), so every bound and the estimate can
be checked against the exact full-vocabulary KL on every row.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantcheck.metrics.next_token import (
    TOP_K,
    kl_divergence,
    kl_from_top_k,
    tail_kl_upper,
    tail_log_mass,
    tail_samples,
    top_k_ids,
)

VOCAB = 4096


def rows(n: int, spread: float, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and variant log-probabilities (float32, as the backends return them): logits, and logits plus noise."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, VOCAB, generator=generator, dtype=torch.float64) * spread
    noisy = logits + torch.randn(n, VOCAB, generator=generator, dtype=torch.float64) * noise
    return torch.log_softmax(logits, -1).float(), torch.log_softmax(noisy, -1).float()


def compact(reference: torch.Tensor, k: int, samples: int) -> tuple[torch.Tensor, ...]:
    """What the compact store keeps of each row, at the precision it keeps it."""
    top = top_k_ids(reference, k)
    drawn = tail_samples(reference, top, samples, seeds=list(range(reference.shape[0])))
    return top, reference.gather(-1, top), tail_log_mass(reference, top), drawn, reference.gather(-1, drawn)


def test_tail_mass_is_stable_where_one_minus_the_top_cancels():
    logits = torch.zeros(1, VOCAB, dtype=torch.float64)
    logits[0, :3] = 30.0  # three tokens hold all but ~1e-10 of the mass
    reference = torch.log_softmax(logits, -1)
    top = top_k_ids(reference, 3)
    expected = math.log((VOCAB - 3) / (3 * math.exp(30) + VOCAB - 3))
    assert tail_log_mass(reference, top).item() == pytest.approx(expected, rel=1e-12)
    naive = torch.log1p(-reference.float().gather(-1, top).exp().sum())  # log(1 - sum p_top) in float32
    assert not math.isfinite(naive.item()) or abs(naive.item() - expected) > 1


@pytest.mark.parametrize("spread, noise", [(3.0, 0.05), (3.0, 0.5), (1.0, 0.3), (6.0, 1.0)])
def test_bounds_hold_and_the_estimate_is_close_on_every_row(spread, noise):
    reference, variant = rows(64, spread, noise)
    exact = kl_divergence(reference, variant)
    bounds = kl_from_top_k(*compact(reference, 64, 128), variant)
    assert (bounds.lower <= exact + 1e-12).all() and (exact <= bounds.upper + 1e-12).all()
    assert (bounds.lower <= bounds.estimate).all() and (bounds.estimate <= bounds.upper).all()
    # The estimate is unbiased: its mean over rows is close to the exact mean, closer than the lower bound.
    assert bounds.estimate.mean().item() == pytest.approx(exact.mean().item(), rel=0.03)
    assert abs(bounds.estimate.mean() - exact.mean()) < abs(bounds.lower.mean() - exact.mean())


def test_an_identical_variant_has_zero_kl_and_zero_lower_bound():
    reference, _ = rows(8, 3.0, 0.0)
    bounds = kl_from_top_k(*compact(reference, 64, 128), reference)
    assert bounds.estimate.tolist() == [0.0] * 8 and bounds.lower.tolist() == [0.0] * 8
    assert bounds.se.tolist() == [0.0] * 8  # no sampling error where every drawn term is 0
    assert (bounds.upper > 0).all()  # the worst case over the unstored tail is not zero: that is why it is loose


def test_a_tail_of_one_token_makes_every_figure_exact():
    reference, variant = rows(4, 3.0, 0.5)
    bounds = kl_from_top_k(*compact(reference, VOCAB - 1, 8), variant)
    exact = kl_divergence(reference, variant)
    for figure in (bounds.estimate, bounds.lower, bounds.upper):
        np.testing.assert_allclose(figure.numpy(), exact.numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        bounds.se.numpy(), 0.0, atol=1e-12
    )  # every draw is the one tail token: nothing is sampled


def test_the_upper_bound_is_reached_by_the_worst_tail():
    """The bound is the maximum: a reference whose tail sits at the cap on the variant's least likely tokens attains
    it."""
    _, variant = rows(1, 3.0, 0.5, seed=3)
    top = torch.arange(10)[None]
    cap, tail_mass = 0.01, 0.035  # 3 tokens at the cap, 0.005 on a fourth
    least_likely = torch.argsort(variant[0, 10:].double())[:4] + 10
    probabilities = torch.zeros(VOCAB, dtype=torch.float64)
    probabilities[least_likely] = torch.tensor([cap, cap, cap, tail_mass - 3 * cap], dtype=torch.float64)
    probabilities[:10] = (1 - tail_mass) / 10
    worst = probabilities.log()[None]
    upper = tail_kl_upper(
        variant, top, torch.tensor([tail_mass], dtype=torch.float64), torch.tensor([cap], dtype=torch.float64)
    )
    tail_terms = probabilities[10:] * (worst[0, 10:] - variant[0, 10:].double())
    assert upper.item() == pytest.approx(torch.nansum(tail_terms).item(), rel=1e-12)


def test_systematic_tail_samples_draw_each_token_in_proportion():
    """Each tail token is drawn floor or ceil of S * p~ times: the sample mirrors the tail, not just on average."""
    reference, _ = rows(3, 2.0, 0.0)
    top = top_k_ids(reference, 64)
    samples = 512
    drawn = tail_samples(reference, top, samples, seeds=[0, 1, 2])
    assert drawn.shape == (3, samples)
    assert not bool((drawn[..., None] == top[:, None, :]).any())  # never a top-K token of its own row
    tail = reference.double().exp().scatter(-1, top, 0.0)
    share = samples * tail / tail.sum(-1, keepdim=True)
    counts = torch.zeros_like(share).scatter_add_(-1, drawn, torch.ones_like(drawn, dtype=torch.float64))
    assert ((counts >= share.floor() - 1e-9) & (counts <= share.ceil() + 1e-9)).all()
    assert torch.equal(drawn, tail_samples(reference, top, samples, seeds=[0, 1, 2]))


def test_the_stored_top_k_starts_with_the_top_20_the_metrics_use():
    """Jaccard@k and top-1 come from the stored ids: the tie order must be the one top_k_ids gives for 20."""
    generator = torch.Generator().manual_seed(1)
    reference = torch.log_softmax(
        torch.randn(32, VOCAB, generator=generator).bfloat16().float(), -1
    )  # bf16 logits tie often
    assert torch.equal(top_k_ids(reference, 64)[:, : max(TOP_K)], top_k_ids(reference, max(TOP_K)))


# --- defect 7 of issue #24: each row's estimate carries its own standard error ----------------------------------------
# Unbiased on average is not accurate on one row: on these rows the estimate is off by 2 % (median) and up to 14 % per
# row on peaked rows, 7 % and up to 43 % on flat ones, where the lower bound is 5-12 % of the exact KL.


@pytest.mark.parametrize(
    "spread, noise",
    [(3.0, 0.3), (3.0, 0.05), (1.0, 0.3), (0.5, 0.3)],
    ids=["peaked", "peaked-close", "flat", "flatter"],
)
def test_each_rows_estimate_carries_a_standard_error_that_covers_its_error(spread, noise):
    for seed in range(3):
        reference, variant = rows(200, spread, noise, seed=seed)
        exact = kl_divergence(reference, variant)
        bounds = kl_from_top_k(*compact(reference, 64, 128), variant)
        assert bounds.se is not None and (bounds.se > 0).all()
        error = (bounds.estimate - exact).abs()
        assert (error <= 3 * bounds.se).double().mean() >= 0.97, seed  # normal: 99.7 %; measured 98-100 %
        assert (
            bounds.se / exact
        ).median() < 0.2  # and not by being vacuous: about 3 % of KL on peaked rows, 11 % on flat


def tail_token_made_likelier(n: int, lift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Close reference and variant rows, then the variant makes the reference's 1001st most likely tail token (one the
    128 draws almost never hit) `lift` nats likelier: the damage sits on one tail token."""
    reference, variant = rows(n, 3.0, 0.05, seed=seed)
    top = top_k_ids(reference, 64)
    ranked = torch.argsort(reference.double().scatter(-1, top, -math.inf), dim=-1, descending=True)[:, 1000:1001]
    logits = variant.double().scatter_add(-1, ranked, torch.full_like(ranked, lift, dtype=torch.float64))
    return reference, torch.log_softmax(logits, -1).float()


@pytest.mark.parametrize("lift", [6.0, 12.0])
def test_a_variant_that_moves_its_tail_mass_onto_a_missed_token_gets_a_standard_error_that_says_so(lift):
    """Every drawn term is then alike (their spread is tiny) while the estimate is far off; the drawn ratios q~/p~,
    whose mean over the whole tail is exactly 1, are then far from 1 beyond their own noise, and the standard error says
    so. A token made only 55 times likelier (lift 4) is not told apart from the sample's own noise: the README says
    so."""
    reference, variant = tail_token_made_likelier(300, lift, seed=6)
    exact = kl_divergence(reference, variant)
    bounds = kl_from_top_k(*compact(reference, 64, 128), variant)
    error = (bounds.estimate - exact).abs()
    assert (error / exact).median() > 0.1  # far off on one row at a time: the defect
    assert (error <= 3 * bounds.se).double().mean() >= 0.98
    assert (bounds.lower <= exact + 1e-12).all() and (exact <= bounds.upper + 1e-12).all()  # the bounds hold regardless
