"""Baselines for the sparse (REINFORCE) term of the objective (seed 000, Theorem 1).

Owns ``leave_one_out_baseline``: for response i of a prompt group, the mean of the other
responses' G_{t+1} at the same step t. Responses to one prompt are independent samples given x,
so the baseline of response i is a function of the *other* responses only and, by the vanishing
score (Lemma 2), E[∇ log π(y_t^{(i)}) · b^{(i)}_t] = 0: the estimator stays unbiased
(tests/test_theorem1.py checks it by enumerating every pair of responses).

Tests: ``.venv/bin/pytest tests/test_objective_baselines.py tests/test_theorem1.py -q``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["leave_one_out_baseline"]


def leave_one_out_baseline(returns: Tensor, group_ids: Tensor) -> Tensor:
    """b^{(i)}_t = mean_{j ≠ i, group(j) = group(i)} G^{(j)}_{t+1}.

    returns (B, T) — G_{t+1} on the padded grid; a response shorter than t contributes the value
    of its empty future there (−Σ λ r, as ``discounted_returns`` leaves it); group_ids (B,) int
    → (B, T). A response alone in its group gets baseline 0 (no other sample to compare with).
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = returns.new_zeros(n_groups, returns.shape[1]).index_add_(0, inverse, returns)
    counts = torch.bincount(inverse, minlength=n_groups)[inverse]  # (B,)
    others = (counts - 1).to(returns.dtype)[:, None]  # (B, 1)
    loo = (sums[inverse] - returns) / others.clamp(min=1)
    return torch.where(others > 0, loo, torch.zeros_like(loo))
