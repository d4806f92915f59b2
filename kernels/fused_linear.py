"""The hybrid loss fused with the LM head: logits are built chunk by chunk, never [N, V] at once.

Owns `fused_linear_hybrid_loss(hidden [N, H], weight [V, H], teacher_logprobs, ...)`. For each
chunk of rows it computes logits = hidden_c @ weightᵀ, runs the hybrid-loss forward of
`kernels.dense_kl` on them, writes ∇_z of the chunk into the chunk's own logits buffer (in place),
and folds it into grad_hidden (= ∇_z @ weight) and grad_weight (fp32 accumulator, += ∇_zᵀ @ hidden_c)
before the next chunk, as Liger-Kernel's fused linear losses do.

The gradient computed during the forward is that of the scalar
    L = Σ_n kl_weights[n] · kl[n] + advantages[n] · target_logprob[n]
(kl_weights default 1, advantages default 0). Backward receives (g_kl, g_lp): when they equal
c·(kl_weights, advantages) for one scalar c — any loss of the form c·L, e.g. L · grad_output
or a mean — it returns c times the stored gradients; otherwise it recomputes exactly with the given
per-row weights (a second chunked pass), so autograd is right for every use.
Tests: `pytest tests/test_kernels_fused_linear.py`; benchmark: `benchmarks/bench_fused_linear.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernels.dense_kl import HybridLoss, resolve_backend, run_backward, run_forward
from kernels.validation import FLOAT_DTYPES, KernelInputError, KernelInputs, SideInputs, check_side_inputs

logger = logging.getLogger(__name__)


@dataclass
class _Grads:
    hidden: torch.Tensor | None  # (N, H) in hidden's dtype
    weight: torch.Tensor | None  # (V, H) fp32 accumulator


def default_chunk_size(n: int, h: int, v: int, device_type: str = "cpu") -> int:
    """Rows per chunk: a [chunk, V] logits buffer about as large as hidden [N, H] (Liger's rule),
    but at least 2,048 rows on CUDA and 128 elsewhere: thinner chunk matmuls run slowly. On an H200
    (N=8192, H=4096, V=128,256, bf16) forward + backward took 101.7 ms at Liger's 262 rows, 56.1 at
    1,024 and 48.0 at 2,048 (unfused 68.5), with 4.04, 4.22 and 4.47 GiB above the inputs (19.6)."""
    least = 2048 if device_type == "cuda" else 128
    return max(min(n, least), min(n, math.ceil(n * h / max(v, 1))))


_MIXED_MM_OK: dict[str, bool] = {}  # device type → torch.mm(..., out_dtype=float32) available


def _mixed_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b with half inputs and an fp32 result (CUDA GEMM, fp32 epilogue), or None if unsupported."""
    kind = a.device.type
    if not _MIXED_MM_OK.get(kind, kind == "cuda"):
        return None
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as err:  # older torch / other backends
        logger.info("torch.mm(out_dtype=float32) unavailable on %s (%s); upcasting chunks", kind, err)
        _MIXED_MM_OK[kind] = False
        return None


def _accumulate_weight_grad(acc: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, H) fp32 += grad_zᵀ @ h: fp32 accumulation across chunks whatever the input dtype."""
    if grad_z.dtype == torch.float32:
        acc.addmm_(grad_z.t(), h)
        return
    product = _mixed_mm(grad_z.t(), h)
    if product is not None:
        acc.add_(product)
    else:  # no mixed-precision mm here (e.g. CPU): upcast the chunk
        acc.addmm_(grad_z.t().float(), h.float())


def _chunk_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    side: SideInputs,
    g_kl: torch.Tensor,
    g_lp: torch.Tensor,
    rows: slice,
    backend: str,
    grads: _Grads,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = hidden[rows]
    logits = h @ weight.t()  # (c, V), input dtype; the only [·, V] buffer of the op
    inp = KernelInputs(
        logits,
        side.teacher_logprobs[:, rows],
        side.alpha,
        None if side.ids is None else side.ids[rows],
        None if side.targets is None else side.targets[rows],
        None if side.teacher_lse is None else side.teacher_lse[:, rows],
    )
    stats = run_forward(inp, backend)
    grad_z = run_backward(inp, stats, g_kl[rows], g_lp[rows], logits, backend)  # in place
    if grads.hidden is not None:
        grads.hidden[rows] = grad_z @ weight
    if grads.weight is not None:
        _accumulate_weight_grad(grads.weight, grad_z, h)
    return stats.kl, stats.target_logprob


def chunked_hybrid_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    side: SideInputs,
    g_kl: torch.Tensor,
    g_lp: torch.Tensor,
    chunk: int,
    backend: str,
    need: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, _Grads]:
    """kl, target log-prob and the gradients of Σ g_kl·kl + g_lp·target_logprob, chunk by chunk."""
    n = hidden.shape[0]
    grads = _Grads(
        torch.empty_like(hidden) if need[0] else None,
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None,
    )
    kl = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lp = torch.empty_like(kl)
    with torch.no_grad():
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            kl[rows], lp[rows] = _chunk_pass(hidden, weight, side, g_kl, g_lp, rows, backend, grads)
    return kl, lp, grads


def _common_scale(g: torch.Tensor, w: torch.Tensor) -> float | None:
    """c with g == c·w (both (2N,)), or None when g is not a multiple of w."""
    if torch.equal(g, w):
        return 1.0
    norm = float(w.dot(w))
    if norm == 0.0:
        return 0.0 if not bool(g.any()) else None
    c = float(g.dot(w)) / norm
    tol = 1e-5 * max(float(g.abs().max()), float((c * w).abs().max()), 1e-30)
    return c if float((g - c * w).abs().max()) <= tol else None


class FusedLinearHybridFunction(torch.autograd.Function):
    """Gradients computed in forward for L = Σ w·kl + A·target_logprob; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        side: SideInputs,
        kl_weights: torch.Tensor,
        advantages: torch.Tensor,
        chunk: int,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        kl, lp, grads = chunked_hybrid_pass(
            hidden, weight, side, kl_weights, advantages, chunk, backend, need
        )
        ctx.save_for_backward(hidden, weight, kl_weights, advantages)
        ctx.side, ctx.chunk, ctx.backend, ctx.need = side, chunk, backend, need
        ctx.grad_hidden = grads.hidden
        ctx.grad_weight = None if grads.weight is None else grads.weight.to(weight.dtype)
        return kl, lp

    @staticmethod
    def backward(ctx: Any, g_kl: torch.Tensor, g_lp: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, kl_weights, advantages = ctx.saved_tensors
        c = _common_scale(torch.cat([g_kl.float(), g_lp.float()]), torch.cat([kl_weights, advantages]))
        if c is None:
            logger.debug("grad outputs are not c·(kl_weights, advantages): recomputing")
            _, _, grads = chunked_hybrid_pass(
                hidden,
                weight,
                ctx.side,
                g_kl.float().contiguous(),
                g_lp.float().contiguous(),
                ctx.chunk,
                ctx.backend,
                ctx.need,
            )
            gw = None if grads.weight is None else grads.weight.to(weight.dtype)
            return grads.hidden, gw, None, None, None, None, None
        gh, gw = ctx.grad_hidden, ctx.grad_weight
        if c != 1.0:
            gh = None if gh is None else gh * c
            gw = None if gw is None else gw * c
        return gh, gw, None, None, None, None, None


def _check_row_vector(
    x: torch.Tensor | None, name: str, n: int, like: torch.Tensor, fill: float
) -> torch.Tensor:
    if x is None:
        return torch.full((n,), fill, dtype=torch.float32, device=like.device)
    if x.shape != (n,) or not x.is_floating_point():
        raise KernelInputError(f"{name}: expected a float tensor of shape [N={n}], got {tuple(x.shape)}")
    if x.device != like.device:
        raise KernelInputError(f"{name}: is on {x.device} but hidden is on {like.device}")
    if not bool(torch.isfinite(x).all()):
        raise KernelInputError(f"{name}: must be finite")
    return x.detach().float().contiguous()


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if hidden.dim() != 2 or hidden.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"hidden: expected a float [N, H] tensor, got {tuple(hidden.shape)} {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise KernelInputError(f"weight: expected [V, H={hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise KernelInputError("weight: must have hidden's dtype and device")


def fused_linear_hybrid_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None = None,
    *,
    teacher_weights: torch.Tensor | Sequence[float] | None = None,
    targets: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    teacher_is_logits: bool = False,
) -> HybridLoss:
    """`hybrid_loss(hidden @ weightᵀ, ...)` without materialising the [N, V] logits.

    hidden (N, H), weight (V, H) (same dtype); the other arguments as in `hybrid_loss`;
    advantages (N,) A_t (default 0) and kl_weights (N,) (default 1) define the scalar whose
    gradient is computed during the forward (module docstring); chunk_size rows per chunk.
    """
    _check_linear(hidden, weight)
    n, v = hidden.shape[0], weight.shape[0]
    side = check_side_inputs(
        n, v, hidden.device, teacher_logprobs, ids, teacher_weights, targets, teacher_is_logits
    )
    w = _check_row_vector(kl_weights, "kl_weights", n, hidden, 1.0)
    a = _check_row_vector(advantages, "advantages", n, hidden, 0.0)
    if chunk_size is not None and chunk_size < 1:
        raise KernelInputError(f"chunk_size: must be >= 1, got {chunk_size}")
    chunk = chunk_size or default_chunk_size(n, hidden.shape[1], v, hidden.device.type)
    chosen = resolve_backend(backend, hidden.device)
    kl, lp = FusedLinearHybridFunction.apply(hidden, weight, side, w, a, chunk, chosen)
    return HybridLoss(kl, lp)
