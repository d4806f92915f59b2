"""Public dense-KL / hybrid-loss ops: backend choice, the autograd Function and the functional API.

Owns `hybrid_loss` (kl + target log-prob, both differentiable, gradient in one pass over the row)
and `dense_kl` (its kl only, single teacher). Forward returns per row (seed 000):
  kl[n] = Σ_m α_m KL(p_n‖q_{m,n})  (full vocabulary, Prop. 5 / eq. 14), or
  kl[n] = Σ_m α_m Σ_{i∈S} p_i(log p_i − log q_{m,i})  (support ids, appendix B.2, no renormalisation),
  target_logprob[n] = log p_n[y_n].
Backward receives (g_kl, g_lp) and writes, reading the logits once per row,
  ∇_z = g_kl · p ⊙ (Σα·log p − Σ_m α_m log q_m − kl)  (eq. 11 / 14; B.2: on S only)
      + g_lp · (onehot(y) − p)                        (the sparse REINFORCE term of Theorem 1).
Backends: "triton" (`kernels.triton_backend`, CUDA, or CPU tensors under TRITON_INTERPRET=1) and
"torch" (`kernels.torch_backend`, chunked fused path). Tests: `pytest tests/test_kernels_dense_kl.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from kernels import torch_backend
from kernels.validation import BackendUnavailableError, KernelInputError, KernelInputs, RowStats, check_inputs

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


class HybridLoss(NamedTuple):
    """Per-row parts of the loss, both (N,) fp32 and differentiable w.r.t. the logits."""

    kl: torch.Tensor  # Σ_m α_m KL(p‖q_m), or the B.2 kl_approx on the support
    target_logprob: torch.Tensor  # log p[y]; 0 where targets < 0 or absent


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when triton's CPU interpreter is requested (read at call time, never at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to "triton" (CUDA tensors, triton importable) or "torch"; check explicit choices."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if not _triton_importable():
        raise BackendUnavailableError("backend: 'triton' requested but triton is not installed")
    if device.type != "cuda" and not interpreter_enabled():
        raise BackendUnavailableError(
            f"backend: 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 in the environment"
        )
    return "triton"


def run_forward(inp: KernelInputs, backend: str) -> RowStats:
    if backend == "triton":
        from kernels.triton_backend import triton_forward  # lazy: triton is optional on CPU

        return triton_forward(inp)
    return torch_backend.torch_forward(inp)


def run_backward(
    inp: KernelInputs,
    stats: RowStats,
    g_kl: torch.Tensor,
    g_lp: torch.Tensor,
    out: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    if backend == "triton":
        from kernels.triton_backend import triton_backward

        return triton_backward(inp, stats, g_kl, g_lp, out)
    return torch_backend.torch_backward(inp, stats, g_kl, g_lp, out)


class HybridLossFunction(torch.autograd.Function):
    """Autograd glue: saves O(N) row statistics, recomputes p in backward (no [N, V] saved)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        teacher_logprobs: torch.Tensor,
        alpha: torch.Tensor,
        ids: torch.Tensor | None,
        targets: torch.Tensor | None,
        teacher_lse: torch.Tensor | None,
        inplace_grad: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inp = KernelInputs(logits, teacher_logprobs, alpha, ids, targets, teacher_lse)
        stats = run_forward(inp, backend)
        ctx.save_for_backward(
            logits,
            teacher_logprobs,
            alpha,
            ids,
            targets,
            teacher_lse,
            stats.row_max,
            stats.log_sum,
            stats.kl,
        )
        ctx.inplace_grad, ctx.backend = inplace_grad, backend
        return stats.kl, stats.target_logprob

    @staticmethod
    def backward(
        ctx: Any, grad_kl: torch.Tensor, grad_logprob: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        logits, lq, alpha, ids, targets, lse, row_max, log_sum, kl = ctx.saved_tensors
        inp = KernelInputs(logits, lq, alpha, ids, targets, lse)
        stats = RowStats(row_max, log_sum, kl, torch.zeros_like(kl))
        out = logits if ctx.inplace_grad else torch.empty_like(logits)
        g_kl = grad_kl.float().contiguous()
        g_lp = grad_logprob.float().contiguous()
        grad = run_backward(inp, stats, g_kl, g_lp, out, ctx.backend)
        return grad, None, None, None, None, None, None, None


def hybrid_loss(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    teacher_weights: torch.Tensor | Sequence[float] | None = None,
    targets: torch.Tensor | None = None,
    inplace_grad: bool = False,
    backend: str = "auto",
    teacher_is_logits: bool = False,
) -> HybridLoss:
    """Dense KL (full vocabulary or support) and target log-prob per row; see the module docstring.

    logits (N, V) fp32/bf16/fp16; teacher_logprobs (N, V) / (N, K) or (M, N, V) / (M, N, K) for M
    teachers sharing `ids` (N, K) (entries < 0 are padding); teacher_weights (M,) α_m ≥ 0 (default
    ones); targets (N,) sampled tokens (< 0 = no sparse term). With inplace_grad=True the backward
    writes ∇_z into the logits' storage: the caller must not read the logits afterwards.
    teacher_is_logits=True (full vocabulary only): teacher_logprobs holds raw teacher logits,
    normalised inside (log q = t − logsumexp(t), one extra read of the teacher in the forward).
    """
    inp = check_inputs(logits, teacher_logprobs, ids, teacher_weights, targets, teacher_is_logits)
    chosen = resolve_backend(backend, logits.device)
    kl, target_logprob = HybridLossFunction.apply(
        inp.logits,
        inp.teacher_logprobs,
        inp.alpha,
        inp.ids,
        inp.targets,
        inp.teacher_lse,
        inplace_grad,
        chosen,
    )
    return HybridLoss(kl, target_logprob)


def dense_kl(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    teacher_is_logits: bool = False,
) -> torch.Tensor:
    """Per-row KL(p‖q) (teacher_logprobs [N, V]) or B.2 kl_approx (ids [N, K], teacher [N, K]).

    Backward gives exactly eq. 11 (or the B.2 formula on the support) times grad_output.
    """
    if teacher_logprobs.dim() != 2:
        raise KernelInputError(
            f"teacher_logprobs: dense_kl takes one teacher, shape [N, V] or [N, K], "
            f"got {tuple(teacher_logprobs.shape)} (use hybrid_loss for several teachers)"
        )
    return hybrid_loss(logits, teacher_logprobs, ids, backend=backend, teacher_is_logits=teacher_is_logits).kl
