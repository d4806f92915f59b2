"""Float64 reference of the hybrid loss: the one ground truth for tests and benchmarks.

Owns the numerical semantics every backend must reproduce (seed 000):
- `hybrid_terms`: per row, kl = Σ_m α_m KL(p‖q_m) over the full vocabulary (Prop. 5, eq. 14) or
  kl_approx = Σ_m α_m Σ_{i∈S} p_i (log p_i − log q_{m,i}) on a support S without renormalisation
  (appendix B.2), and target_logprob = log p[y]. Written with plain differentiable torch ops, so
  autograd of it is the textbook derivative.
- `hybrid_grad`: the closed-form gradient the kernels implement, eq. 11 / eq. 14 on the full
  vocabulary, the B.2 estimator on a support (zero outside S), plus the sparse term
  g_lp · (onehot(y) − p).

Teacher log-probs are clamped below at `LOGQ_FLOOR` first; with `teacher_is_logits=True` (full
vocabulary only) the teacher's logits are first normalised with their own row logsumexp.
Simple and slow on purpose (it builds several [N, V] float64 tensors); never use it for
training. Run its checks with `pytest tests/test_kernels_dense_kl.py -k reference`.
"""

from __future__ import annotations

import torch

# A teacher log-prob of −inf (vocab masked by the teacher) would make KL infinite and the gradient
# NaN. We clamp at −1e4 nats: far below anything a teacher's log_softmax yields for a real token
# (fp32 logit gaps of 1e4 do not occur; the log of the smallest fp32 subnormal is −103), yet small
# enough that fp32 keeps ~1e-3 absolute resolution of (log p − log q) and the per-token penalty
# p·1e4 stays finite, so a student putting mass on a forbidden token is pushed away hard, not NaN'd.
LOGQ_FLOOR = -1.0e4


def clamp_teacher(teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs with −inf (and anything below) replaced by `LOGQ_FLOOR`."""
    return torch.clamp(teacher_logprobs, min=LOGQ_FLOOR)


def _as_float64(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    alpha: torch.Tensor | None,
    teacher_is_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = logits.double()  # (N, V)
    lq = teacher_logprobs.double()
    lq = lq.unsqueeze(0) if lq.dim() == 2 else lq  # (M, N, X)
    if teacher_is_logits:  # full vocabulary only: normalise the teacher's logits row by row
        lse = torch.logsumexp(lq, dim=-1, keepdim=True)
        lq = lq - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    a = torch.ones(lq.shape[0], dtype=torch.float64) if alpha is None else alpha.double().cpu()
    return z, clamp_teacher(lq), a.to(z.device)


def _weighted_logq(lq: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_m α_m log q_m, the folded multi-teacher term of eq. 14."""
    return torch.einsum("m,mnx->nx", a, lq)


def _support_view(logp: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p restricted to the support (or the full row) and a mask of the real entries."""
    if ids is None:
        return logp, torch.ones_like(logp, dtype=torch.bool)
    valid = ids >= 0
    return torch.gather(logp, 1, ids.clamp(min=0)), valid


def hybrid_terms(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    teacher_is_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl [N], target_logprob [N]) in float64; differentiable w.r.t. logits when they are finite."""
    z, lq, a = _as_float64(logits, teacher_logprobs, alpha, teacher_is_logits)
    logp_full = torch.log_softmax(z, dim=-1)
    logp, valid = _support_view(logp_full, ids)
    p = logp.exp()
    real = valid & (p > 0)  # p = 0 (student logit −inf) contributes 0, not 0·(−inf)
    lp_safe = torch.where(real, logp, torch.zeros_like(logp))
    inner = a.sum() * lp_safe - _weighted_logq(lq, a)
    kl = torch.where(real, p * inner, torch.zeros_like(p)).sum(dim=-1)
    return kl, _target_logprob(logp_full, targets)


def _target_logprob(logp_full: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        return torch.zeros(logp_full.shape[0], dtype=logp_full.dtype, device=logp_full.device)
    picked = torch.gather(logp_full, 1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(targets >= 0, picked, torch.zeros_like(picked))


def hybrid_grad(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    grad_kl: torch.Tensor | None = None,
    grad_logprob: torch.Tensor | None = None,
    teacher_is_logits: bool = False,
) -> torch.Tensor:
    """Closed-form ∇_z in float64: g_kl·p⊙(Σα·log p − Σα_m log q_m − kl) + g_lp·(onehot(y) − p).

    Full vocabulary: eq. 11 (one teacher) / eq. 14 (α-weighted). Support: the B.2 formula on S
    with the full-row p and kl_approx, zero outside S (note: this is the seed's estimator, not the
    exact derivative of kl_approx, which would also touch ids outside S).
    """
    z, lq, a = _as_float64(logits, teacher_logprobs, alpha, teacher_is_logits)
    n = z.shape[0]
    g_kl = torch.ones(n, dtype=torch.float64) if grad_kl is None else grad_kl.double().cpu()
    g_lp = torch.zeros(n, dtype=torch.float64) if grad_logprob is None else grad_logprob.double().cpu()
    g_kl, g_lp = g_kl.to(z.device), g_lp.to(z.device)
    kl, _ = hybrid_terms(logits.detach(), teacher_logprobs, ids, alpha, None, teacher_is_logits)
    logp_full = torch.log_softmax(z, dim=-1)
    p_full = logp_full.exp()
    logp, valid = _support_view(logp_full, ids)
    p = logp.exp()
    real = valid & (p > 0)
    lp_safe = torch.where(real, logp, torch.zeros_like(logp))
    dense = p * (a.sum() * lp_safe - _weighted_logq(lq, a) - kl.double().unsqueeze(1))
    dense = torch.where(real, dense, torch.zeros_like(dense)) * g_kl.unsqueeze(1)
    grad = torch.zeros_like(z)
    if ids is None:
        grad += dense
    else:
        grad.scatter_add_(1, ids.clamp(min=0), torch.where(valid, dense, torch.zeros_like(dense)))
    if targets is not None:
        onehot = torch.zeros_like(z)
        rows = torch.arange(n, device=z.device)[targets >= 0]
        onehot[rows, targets[targets >= 0]] = 1.0
        sparse = onehot - torch.where(torch.isnan(p_full), torch.zeros_like(p_full), p_full)
        grad += g_lp.unsqueeze(1) * sparse * (targets >= 0).unsqueeze(1)
    return grad
