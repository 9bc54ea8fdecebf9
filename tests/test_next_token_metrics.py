"""KL, Jaccard@k and top-k against hand-worked values and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from quantcheck.metrics.next_token import jaccard_all_k, jaccard_at_k, kl_divergence, top_k_ids


def test_kl_matches_scipy_on_random_distributions():
    generator = torch.Generator().manual_seed(0)
    logits_p = torch.randn(16, 5000, generator=generator, dtype=torch.float64) * 3
    logits_q = logits_p + torch.randn(16, 5000, generator=generator, dtype=torch.float64) * 0.3
    p, q = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    ours = kl_divergence(p, q).numpy()
    expected = [entropy(np.exp(p[i].double().numpy()), np.exp(q[i].double().numpy())) for i in range(16)]
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
    assert (ours > 0).all()


def test_kl_hand_worked_two_token_case():
    p = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    q = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-12)


def test_kl_is_zero_for_identical_rows_and_ignores_zero_probability_tokens():
    p = torch.log(torch.tensor([[0.7, 0.3, 0.0]]))
    q = torch.log(torch.tensor([[0.7, 0.3, 0.0]]))
    assert kl_divergence(p, q).item() == 0.0
    q_other = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    assert kl_divergence(p, q_other).item() == pytest.approx(0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.3))


def test_jaccard_hand_worked():
    reference = [1, 2, 3, 4, 5]
    variant = [1, 3, 2, 9, 8]
    assert jaccard_at_k(reference, variant, 1) == 1.0
    assert jaccard_at_k(reference, variant, 2) == pytest.approx(1 / 3)  # {1,2} vs {1,3}
    assert jaccard_at_k(reference, variant, 3) == 1.0  # {1,2,3} both
    assert jaccard_at_k(reference, variant, 5) == pytest.approx(3 / 7)
    assert jaccard_all_k([7] * 20, [8] * 20, (1,)) == {1: 0.0}


def test_top_k_ids_are_sorted_by_probability():
    logprobs = torch.log_softmax(torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]]), -1)
    assert top_k_ids(logprobs, 3).tolist() == [[1, 4, 2]]


def reference_top_k(row: list[float], k: int) -> list[int]:
    """Sorted by (-value, id) in plain Python: the order top_k_ids must reproduce."""
    return sorted(range(len(row)), key=lambda token: (-row[token], token))[:k]


def test_top_k_ties_go_to_the_lower_token_id():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5, 1.0], [2.0, 1.0, 2.0, 1.0, 2.0, 0.0]])
    assert top_k_ids(logits, 3).tolist() == [[1, 2, 3], [0, 2, 4]]
    assert top_k_ids(logits, 5).tolist() == [[1, 2, 3, 5, 4], [0, 2, 4, 1, 3]]


def test_top_k_matches_a_sort_on_bf16_rows_with_many_ties():
    """bf16 logits over a 49152-token vocabulary tie often, also past the candidates topk takes."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(8, 49152, generator=generator) * 2).to(torch.bfloat16)
    logits[3] = 0.0  # a flat row: every token tied
    logits[5, :100] = logits[5].max()  # 100 tokens tied for first place
    logprobs = torch.log_softmax(logits.float(), dim=-1).to(torch.bfloat16)
    ours = top_k_ids(logprobs, 20).tolist()
    rows = logprobs.double().tolist()
    assert ours == [reference_top_k(row, 20) for row in rows]
    assert ours[3] == list(range(20)) and ours[5] == list(range(20))
    assert any(len(set(row[:40])) < 40 for row in logprobs.double().topk(40).values.tolist())  # ties are there


def test_top_k_does_not_follow_the_position_of_ties():
    """The same values with the tied tokens placed elsewhere give the ids, not the positions."""
    row = torch.tensor([[0.25, 0.75, 0.5, 0.75, 0.75]])
    assert top_k_ids(row, 2).tolist() == [[1, 3]]
    assert top_k_ids(row.flip(-1), 2).tolist() == [[0, 1]]
