"""Per-token weights of the dense term: token importance (seed 002 ch. 7) and SelecTKD (seed 001).

Both are stop-gradient: computed under ``torch.no_grad`` from the student's logits and the
teachers' log-probs, then multiplied into the per-token divergence by ``learner.objective`` (the
kernels are untouched). Rows are N = B·T flattened positions; M teachers; inputs as in
``learner.divergences``: ``teacher`` (M, N, V) on the full vocabulary or (M, N, K) at ``ids``
(N, K), ids < 0 = padding. Computed in row chunks, so no (N, V) intermediate beyond one chunk.

- Token importance, seed 002 ch. 7 (pillar 1): w_t = (1 − H(P_T)/log V) · KL(P_T‖P_θ), V the
  vocabulary size. Exact on the full vocabulary. On a top-K support the teacher's full
  distribution is unknown, so H and KL are those of teacher and student renormalized over the
  support (H ≤ log K there: the confidence factor is then an upper estimate). With several
  teachers, w_t is the α-weighted mean of the teachers' scores.
- SelecTKD, seed 001 (appendix E, the proof of Theorem 2), p = teacher, q_θ = student:
  greedy_top_k accepts a position when argmax_y q_θ(y) ∈ Top_k(p); spec_k when at least one of k
  candidates sampled from q_θ passes the speculative acceptance test u < min(1, p(y)/q_θ(y)),
  u ~ U(0, 1) (the global torch RNG, which checkpoints capture). On a support, a candidate
  outside it has an unknown teacher probability and is rejected (taken as 0, as the dense term
  does). With several teachers a position is accepted when every teacher accepts it.

Tests: ``.venv/bin/pytest tests/test_run_options_learner.py -q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["greedy_top_k_accept", "importance_scores", "spec_k_accept"]

CHUNK_ROWS = 1024
NEG_INF = float("-inf")


def _chunked(fn: Callable[..., Tensor], logits: Tensor, teacher: Tensor, *rows: Tensor | None) -> Tensor:
    """Apply ``fn(logits[c], teacher[:, c], *(r[c] or r[:, c]))`` over row chunks c, concatenated.

    Extra per-row tensors are indexed on their row axis: axis 0 for (N, …), axis 1 for (M, N, …).
    """
    out = []
    with torch.no_grad():
        for start in range(0, logits.shape[0], CHUNK_ROWS):
            c = slice(start, start + CHUNK_ROWS)
            extra = [None if r is None else (r[:, c] if r.dim() == 3 else r[c]) for r in rows]
            out.append(fn(logits[c].detach(), teacher[:, c], *extra))
    if not out:
        return logits.new_zeros(0)
    return torch.cat(out)


def _log_softmax(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


# ------------------------------------------------------------------------- token importance


def importance_scores(logits: Tensor, teacher: Tensor, ids: Tensor | None, alphas: Tensor) -> Tensor:
    """(N,) w_t = Σ_m α_m (1 − H(q_m)/log V)·KL(q_m‖p) / Σ_m α_m (seed 002 ch. 7); 0 if Σα = 0."""
    total = float(alphas.sum())
    if total <= 0:
        return logits.new_zeros(logits.shape[0], dtype=torch.float32)
    a = (alphas / total).to(device=logits.device)
    return _chunked(lambda z, lq, i: _importance_rows(z, lq, i, a), logits, teacher, ids)


def _renormalize(lq: Tensor, valid: Tensor) -> Tensor:
    """Log-probs restricted to ``valid`` and renormalized there; −inf elsewhere (and on empty rows)."""
    masked = torch.where(valid, lq, NEG_INF)
    out = masked - masked.logsumexp(-1, keepdim=True)
    return torch.where(valid, out, NEG_INF)


def _importance_rows(logits: Tensor, lq: Tensor, ids: Tensor | None, alphas: Tensor) -> Tensor:
    lp = _log_softmax(logits)
    log_v = math.log(logits.shape[-1]) if logits.shape[-1] > 1 else 1.0
    lq = lq.to(lp.dtype)
    if ids is not None:
        valid = ids >= 0
        lp = _renormalize(lp.gather(-1, ids.clamp(min=0)), valid)
        lq = _renormalize(lq, valid.expand_as(lq))
    q = lq.exp()
    live = q > 0  # 0·log 0 = 0: teacher zeros and entries off the support add nothing
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    entropy = -torch.where(live, q * lq, zero).sum(-1)  # (M, n)
    kl = torch.where(live, q * (lq - lp), zero).sum(-1)  # (M, n) KL(q‖p)
    score = (1.0 - entropy / log_v) * kl
    return torch.einsum("m,mn->n", alphas.to(score.dtype), score).float()


# ---------------------------------------------------------------------------------- SelecTKD


def greedy_top_k_accept(
    logits: Tensor, teacher: Tensor, k: int, top_ids: Tensor | None = None, top_lp: Tensor | None = None
) -> Tensor:
    """(N,) bool: the student's argmax is among each teacher's top-k (ties at the k-th count in).

    Without ``top_ids``, ``teacher`` must be the full vocabulary (M, N, V). With them, each
    teacher's top-K' list: ids (M, N, K') and log-probs (M, N, K'), K' ≥ k, in any order.
    """
    if top_ids is None:
        return _chunked(lambda z, lq: _greedy_full(z, lq, k), logits, teacher)
    assert top_lp is not None
    return _chunked(lambda z, _, i, lp: _greedy_list(z, i, lp, k), logits, teacher, top_ids, top_lp)


def _greedy_full(logits: Tensor, lq: Tensor, k: int) -> Tensor:
    a = logits.argmax(-1)  # (n,)
    kth = lq.topk(k, dim=-1).values[..., -1]  # (M, n) the teacher's k-th largest log-prob
    at_a = lq.gather(-1, a.view(1, -1, 1).expand(lq.shape[0], -1, 1)).squeeze(-1)
    return ((at_a >= kth) & torch.isfinite(at_a)).all(0)


def _greedy_list(logits: Tensor, ids: Tensor, lp: Tensor, k: int) -> Tensor:
    a = logits.argmax(-1)
    lp = torch.where(ids >= 0, lp.to(torch.float32), NEG_INF)
    kth = lp.sort(-1, descending=True).values[..., k - 1]
    at_a = torch.where(ids == a.view(1, -1, 1), lp, NEG_INF).amax(-1)  # −inf: not in the list
    return ((at_a >= kth) & torch.isfinite(at_a)).all(0)


def spec_k_accept(logits: Tensor, teacher: Tensor, ids: Tensor | None, k: int) -> Tensor:
    """(N,) bool: at least one of k samples y ~ q_θ passes u < min(1, p_m(y)/q_θ(y)), for every m."""
    return _chunked(lambda z, lq, i: _spec_rows(z, lq, i, k), logits, teacher, ids)


def _spec_rows(logits: Tensor, lq: Tensor, ids: Tensor | None, k: int) -> Tensor:
    ls = _log_softmax(logits)  # (n, V) student
    n, m = ls.shape[0], lq.shape[0]
    cand = torch.multinomial(ls.exp(), k, replacement=True)  # (n, k) proposals from the student
    ls_c = ls.gather(-1, cand)
    if ids is None:
        lt = lq.to(ls.dtype).gather(-1, cand.unsqueeze(0).expand(m, n, k))  # (M, n, k)
    else:
        match = cand.unsqueeze(-1) == ids.unsqueeze(1)  # (n, k, K); padding ids < 0 never match
        lt = torch.where(match.unsqueeze(0), lq.to(ls.dtype).unsqueeze(2), NEG_INF).amax(-1)
    u = torch.rand(n, k, device=ls.device, dtype=ls.dtype)
    # u < p/q ⟺ log u < log p − log q; u < 1 makes the min(1, ·) implicit.
    passes = u.log().unsqueeze(0) < lt - ls_c.unsqueeze(0)
    return passes.any(-1).all(0)
