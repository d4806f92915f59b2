"""Leave-one-out baseline (learner/baselines.py). Its unbiasedness inside the full estimator is
checked by enumeration in tests/test_theorem1.py."""

from __future__ import annotations

import torch

from learner.baselines import leave_one_out_baseline


def test_values_by_hand() -> None:
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [10.0, 20.0]])
    groups = torch.tensor([7, 7, 7, 2])
    b = leave_one_out_baseline(g, groups)
    want = torch.tensor([[4.0, 5.0], [3.0, 4.0], [2.0, 3.0], [0.0, 0.0]])  # last: alone
    torch.testing.assert_close(b, want)


def test_does_not_depend_on_own_response() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 5, generator=gen)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    b = leave_one_out_baseline(g, groups)
    for i in range(8):
        changed = g.clone()
        changed[i] = torch.randn(5, generator=gen) * 100
        torch.testing.assert_close(leave_one_out_baseline(changed, groups)[i], b[i])
        # ... but it does depend on the others in its group (it is not a constant).
        other = (i + 2) % 8
        changed = g.clone()
        changed[other] += 1.0
        assert not torch.allclose(leave_one_out_baseline(changed, groups)[i], b[i])


def test_centred_returns_sum_to_zero_in_each_group() -> None:
    """Σ_i (G_i − b_i) = 0 within a group of K: the LOO-centred returns sum to zero (RLOO)."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(12, 3, generator=gen)
    groups = torch.arange(12) // 4
    centred = g - leave_one_out_baseline(g, groups)
    torch.testing.assert_close(centred.view(3, 4, 3).sum(1), torch.zeros(3, 3), atol=1e-6, rtol=0)
