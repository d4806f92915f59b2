"""Divergences for the dense term of the objective, on student logits, with a registry by name.

Owns: ``register_divergence(name)`` / ``get_divergence(name)`` (verl ``core_algos`` style; an
unknown name raises an error listing the valid ones) and three divergences between the student
p = softmax(z) and teachers q_m, each weighted by α_m and summed over teachers:

- ``reverse_kl`` (the seed's, default): KL(p‖q_m); goes through ``kernels.hybrid_loss`` (Triton
  on GPU, fused torch on CPU), whose gradient is eq. 11 (Prop. 5) / appendix B.2.
- ``forward_kl``: KL(q_m‖p), as in GKD / seed 002 ch. 3.
- ``jsd``: GKD's generalized Jensen–Shannon divergence with P = teacher, Q = student,
  M = βP + (1−β)Q, JSD_β = β KL(P‖M) + (1−β) KL(Q‖M) (seed 002 ch. 3–4; β = 0.5 is the
  symmetric JSD of the seed's worked example). β must lie in (0, 1): at the end points JSD_β
  is identically 0, so use ``forward_kl`` / ``reverse_kl`` (the limits of JSD_β/β, JSD_β/(1−β)).
- ``kl_mix``: seed 003's KL mixing, D = w·KL(q_m‖p) + (1−w)·KL(p‖q_m) with w = ``forward_weight``
  in [0, 1]: the two divergences above, on the same support; w = 0 / 1 computes only one of them.

Every divergence returns ``DenseTerms``: the per-row divergence and the log-prob of the sampled
token (for the sparse term), both differentiable w.r.t. the logits, computed in one pass.

Inputs (N rows, V vocabulary, M teachers, K support ids):
- full vocabulary: ``teacher_logprobs`` (M, N, V), normalized teacher log-probs.
- support: ``ids`` (N, K) int64 (< 0 = padding) and ``teacher_logprobs`` (M, N, K), the teacher's
  full-vocabulary log-probs at those ids. As in appendix B.2 both p and q are restricted to the
  support WITHOUT renormalization, e.g. forward_kl ≈ Σ_{i∈S} q_i (log q_i − log p_i). For
  ``forward_kl`` and ``jsd`` the restricted sum is differentiated exactly by autograd, so some
  gradient reaches logits outside S through the softmax normalizer (B.2's zero-outside-S rule
  is the reverse-KL kernel's).

``forward_kl`` and ``jsd`` are pure torch, evaluated in row chunks under activation
checkpointing so that no (N, V) intermediate beyond one chunk is kept for backward.

Tests: ``.venv/bin/pytest tests/test_divergences.py -q``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import kernels

__all__ = [
    "DenseTerms",
    "Divergence",
    "DivergenceError",
    "check_divergence_params",
    "divergence_names",
    "get_divergence",
    "register_divergence",
    "target_logprobs",
]

# Rows per chunk for the pure-torch divergences: 1024 rows × 150k vocab × 4 B ≈ 600 MB live.
CHUNK_ROWS = 1024


class DivergenceError(ValueError):
    """Unknown divergence, bad parameter or bad input; the message names the field."""


@dataclass(frozen=True)
class DenseTerms:
    """Per-row outputs of a divergence, differentiable w.r.t. the logits."""

    div: Tensor  # (N,) Σ_m α_m D(p_n, q_{m,n}) in nats
    target_logprob: Tensor  # (N,) log p_n[targets[n]], 0 where targets[n] < 0
    # Named per-row parts of ``div``, detached, for metrics (kl_mix: "forward_kl", "reverse_kl").
    parts: Mapping[str, Tensor] = field(default_factory=dict)


# Every registered divergence is called as
#   fn(logits (N, V), teacher_logprobs (M, N, V|K), *, weights (M,), ids (N, K) | None,
#      targets (N,) | None, **params) -> DenseTerms
Divergence = Callable[..., DenseTerms]
ParamCheck = Callable[[Mapping[str, float]], None]
_DIVERGENCES: dict[str, tuple[Divergence, ParamCheck]] = {}


def _no_params(params: Mapping[str, float]) -> None:
    if params:
        raise DivergenceError(f"divergence_params: unexpected {sorted(params)}; takes none")


def register_divergence(
    name: str, check_params: ParamCheck = _no_params
) -> Callable[[Divergence], Divergence]:
    """Decorator adding a divergence under ``name``; ``check_params`` validates its params."""

    def decorator(fn: Divergence) -> Divergence:
        if name in _DIVERGENCES:
            raise DivergenceError(f"divergence {name!r} is already registered")
        _DIVERGENCES[name] = (fn, check_params)
        return fn

    return decorator


def get_divergence(name: str) -> Divergence:
    """The divergence registered under ``name``; an unknown name lists the valid ones."""
    if name not in _DIVERGENCES:
        raise DivergenceError(f"divergence: unknown {name!r}; valid divergences are {divergence_names()}")
    return _DIVERGENCES[name][0]


def check_divergence_params(name: str, params: Mapping[str, float]) -> None:
    """Raise ``DivergenceError`` naming the field if ``params`` do not suit ``name``."""
    get_divergence(name)
    _DIVERGENCES[name][1](params)


def divergence_names() -> list[str]:
    """Registered divergence names, sorted."""
    return sorted(_DIVERGENCES)


# --------------------------------------------------------------------------- reverse KL


@register_divergence("reverse_kl")
def reverse_kl(
    logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    weights: Tensor,
    ids: Tensor | None = None,
    targets: Tensor | None = None,
) -> DenseTerms:
    """Σ_m α_m KL(p‖q_m) per row (eq. 14; B.2 on a support) via ``kernels.hybrid_loss``."""
    _check_inputs(logits, teacher_logprobs, weights, ids)
    out = kernels.hybrid_loss(logits, teacher_logprobs, ids, teacher_weights=weights, targets=targets)
    return DenseTerms(div=out.kl, target_logprob=out.target_logprob)


# ------------------------------------------------------------- forward KL and JSD(β)


@register_divergence("forward_kl")
def forward_kl(
    logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    weights: Tensor,
    ids: Tensor | None = None,
    targets: Tensor | None = None,
) -> DenseTerms:
    """Σ_m α_m KL(q_m‖p) per row (GKD forward KL; restricted to ``ids`` when given)."""
    _check_inputs(logits, teacher_logprobs, weights, ids)
    return _chunked(_forward_kl_chunk, logits, teacher_logprobs, weights, ids, targets, 0.0)


def _check_beta(params: Mapping[str, float]) -> None:
    extra = sorted(set(params) - {"beta"})
    if extra:
        raise DivergenceError(f"divergence_params: unexpected {extra}; jsd takes only 'beta'")
    beta = params.get("beta", 0.5)
    if isinstance(beta, bool) or not isinstance(beta, int | float):
        raise DivergenceError(f"divergence_params.beta: expected a number, got {beta!r}")
    if not (math.isfinite(beta) and 0.0 < beta < 1.0):
        raise DivergenceError(
            f"divergence_params.beta: must be in (0, 1), got {beta}; "
            "for the end points use forward_kl or reverse_kl"
        )


@register_divergence("jsd", check_params=_check_beta)
def jsd(
    logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    weights: Tensor,
    ids: Tensor | None = None,
    targets: Tensor | None = None,
    beta: float = 0.5,
) -> DenseTerms:
    """Σ_m α_m JSD_β(q_m, p), M = β q + (1−β) p, JSD_β = β KL(q‖M) + (1−β) KL(p‖M) (GKD)."""
    _check_beta({"beta": beta})
    _check_inputs(logits, teacher_logprobs, weights, ids)
    return _chunked(_jsd_chunk, logits, teacher_logprobs, weights, ids, targets, beta)


def _forward_kl_chunk(lp: Tensor, lq: Tensor, valid: Tensor | None, beta: float) -> Tensor:
    """(n, S) student / (M, n, S) teacher log-probs → (M, n) KL(q‖p)."""
    q = lq.exp()
    term = q * (lq - lp)
    keep = q > 0 if valid is None else (q > 0) & valid
    return torch.where(keep, term, torch.zeros_like(term)).sum(-1)


def _jsd_chunk(lp: Tensor, lq: Tensor, valid: Tensor | None, beta: float) -> Tensor:
    """(n, S) student / (M, n, S) teacher log-probs → (M, n) JSD_β(q, p)."""
    lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
    from_teacher = lq.exp() * (lq - lm)
    from_student = lp.exp() * (lp - lm)
    term = beta * from_teacher + (1.0 - beta) * from_student
    # A teacher zero (lq = -inf) contributes 0·(−inf) = nan to the first sum; its limit is 0.
    term = torch.where(torch.isfinite(lq), term, (1.0 - beta) * from_student)
    if valid is not None:
        term = torch.where(valid, term, torch.zeros_like(term))
    return term.sum(-1)


def _check_forward_weight(params: Mapping[str, float]) -> None:
    extra = sorted(set(params) - {"forward_weight"})
    if extra:
        raise DivergenceError(f"divergence_params: unexpected {extra}; kl_mix takes only 'forward_weight'")
    w = params.get("forward_weight", 0.5)
    if isinstance(w, bool) or not isinstance(w, int | float) or not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise DivergenceError(f"divergence_params.forward_weight: must be a number in [0, 1], got {w!r}")


@register_divergence("kl_mix", check_params=_check_forward_weight)
def kl_mix(
    logits: Tensor,
    teacher_logprobs: Tensor,
    *,
    weights: Tensor,
    ids: Tensor | None = None,
    targets: Tensor | None = None,
    forward_weight: float = 0.5,
) -> DenseTerms:
    """Σ_m α_m [w·KL(q_m‖p) + (1−w)·KL(p‖q_m)] per row (seed 003's KL mixing, w = forward_weight)."""
    _check_forward_weight({"forward_weight": forward_weight})
    w = float(forward_weight)
    if w in (0.0, 1.0):  # exactly one of the two: bit-for-bit reverse_kl / forward_kl
        name = "forward_kl" if w == 1.0 else "reverse_kl"
        out = get_divergence(name)(logits, teacher_logprobs, weights=weights, ids=ids, targets=targets)
        return replace(out, parts={name: out.div.detach()})
    # Only one of the two calls gathers the target log-prob: the sparse term must count it once.
    rev = reverse_kl(logits, teacher_logprobs, weights=weights, ids=ids, targets=targets)
    fwd = forward_kl(logits, teacher_logprobs, weights=weights, ids=ids)
    parts = {"forward_kl": fwd.div.detach(), "reverse_kl": rev.div.detach()}
    return DenseTerms(div=w * fwd.div + (1.0 - w) * rev.div, target_logprob=rev.target_logprob, parts=parts)


ChunkFn = Callable[[Tensor, Tensor, Tensor | None, float], Tensor]


def _rows(
    fn: ChunkFn,
    beta: float,
    logits: Tensor,
    teacher_logprobs: Tensor,
    weights: Tensor,
    ids: Tensor | None,
    targets: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One chunk: (n, V) logits → ((n,) weighted divergence, (n,) target log-prob)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lp_full = F.log_softmax(logits.to(dtype), dim=-1)  # (n, V)
    lq = teacher_logprobs.to(dtype)  # (M, n, V) or (M, n, K)
    valid = None
    lp = lp_full
    if ids is not None:
        valid = ids >= 0  # (n, K)
        lp = lp_full.gather(-1, ids.clamp(min=0))
    div = torch.einsum("m,mn->n", weights.to(dtype), fn(lp, lq, valid, beta))
    return div, _gather_target(lp_full, targets)


def _chunked(
    fn: ChunkFn,
    logits: Tensor,
    teacher_logprobs: Tensor,
    weights: Tensor,
    ids: Tensor | None,
    targets: Tensor | None,
    beta: float,
) -> DenseTerms:
    divs, tlps = [], []
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        args: tuple[Any, ...] = (
            fn,
            beta,
            logits[rows],
            teacher_logprobs[:, rows],
            weights,
            None if ids is None else ids[rows],
            None if targets is None else targets[rows],
        )
        div, tlp = checkpoint(_rows, *args, use_reentrant=False) if use_ckpt else _rows(*args)
        divs.append(div)
        tlps.append(tlp)
    if not divs:
        empty = logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32))
        return DenseTerms(div=empty, target_logprob=empty)
    return DenseTerms(div=torch.cat(divs), target_logprob=torch.cat(tlps))


# ------------------------------------------------------------------ helpers


def target_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, V) logits, (N,) ids → (N,) log p[targets], 0 where targets < 0 (no teacher needed)."""
    if targets.shape != logits.shape[:1]:
        raise DivergenceError(f"targets: expected shape {tuple(logits.shape[:1])}")
    out = []
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        args = (logits[rows], targets[rows])
        out.append(checkpoint(_target_rows, *args, use_reentrant=False) if use_ckpt else _target_rows(*args))
    if not out:
        return logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32))
    return torch.cat(out)


def _target_rows(logits: Tensor, targets: Tensor) -> Tensor:
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _gather_target(F.log_softmax(logits.to(dtype), dim=-1), targets)


def _gather_target(lp_full: Tensor, targets: Tensor | None) -> Tensor:
    if targets is None:
        return lp_full.new_zeros(lp_full.shape[0])
    picked = lp_full.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets >= 0, picked, torch.zeros_like(picked))


def _check_inputs(logits: Tensor, teacher_logprobs: Tensor, weights: Tensor, ids: Tensor | None) -> None:
    if logits.dim() != 2:
        raise DivergenceError(f"logits: expected (N, V), got shape {tuple(logits.shape)}")
    n, v = logits.shape
    m = weights.shape[0] if weights.dim() == 1 else -1
    if m < 0:
        raise DivergenceError(f"weights: expected (M,), got shape {tuple(weights.shape)}")
    width = v if ids is None else ids.shape[-1]
    if ids is not None and (ids.dim() != 2 or ids.shape[0] != n):
        raise DivergenceError(f"ids: expected ({n}, K), got shape {tuple(ids.shape)}")
    if ids is not None and ids.numel():
        if int(ids.max()) >= v:
            raise DivergenceError(f"ids: values must be < vocab size {v}")
        # A repeated id would be counted twice in the restricted sum.
        srt = ids.sort(dim=1).values
        if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
            raise DivergenceError("ids: the ids of a row must be distinct (padding < 0 may repeat)")
    if tuple(teacher_logprobs.shape) != (m, n, width):
        raise DivergenceError(
            f"teacher_logprobs: expected shape {(m, n, width)}, got {tuple(teacher_logprobs.shape)}"
        )
