"""Input checking and shared data types of the dense-KL kernels.

Owns the domain errors of the `kernels` package, the `RowStats` bundle that every backend's
forward returns (O(N) statistics saved for the recomputing backward), and `check_inputs`, which
validates shapes, dtypes, devices and id ranges of a `hybrid_loss` call and returns a
`KernelInputs` dataclass with the teachers stacked as [M, N, X] and α as an fp32 [M] tensor.
Every error names the offending argument and nothing is modified. Used by `kernels.dense_kl` and
`kernels.fused_linear`; not run directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


class KernelError(Exception):
    """Base class of the errors raised by the kernels package."""


class KernelInputError(KernelError, ValueError):
    """A caller passed a tensor with a bad shape, dtype, device or value; nothing was computed."""


class BackendUnavailableError(KernelError, RuntimeError):
    """The requested backend cannot run on these tensors (e.g. triton on CPU without interpreter)."""


@dataclass(frozen=True)
class KernelInputs:
    """Checked arguments of one hybrid-loss call (shapes after normalisation)."""

    logits: torch.Tensor  # (N, V) fp32/bf16/fp16, last dim contiguous
    teacher_logprobs: torch.Tensor  # (M, N, V) full vocab or (M, N, K) support, last dim contiguous
    alpha: torch.Tensor  # (M,) fp32 teacher weights α_m, on the logits' device
    ids: torch.Tensor | None  # (N, K) int64 support ids, < 0 = padding; None = full vocabulary
    targets: torch.Tensor | None  # (N,) int64 sampled tokens y_t, < 0 = no sparse term on the row
    # (M, N) fp32 row logsumexp of teacher *logits* (log q = t − lse), None when log-probs are given
    teacher_lse: torch.Tensor | None = None


@dataclass(frozen=True)
class RowStats:
    """Per-row results of a forward pass; log p = (z − row_max) − log_sum (all fp32, shape (N,))."""

    row_max: torch.Tensor  # max_j z_j, or 0 for a row whose logits are all −inf
    log_sum: torch.Tensor  # log Σ_j exp(z_j − row_max); +inf for an all −inf row so that p = 0
    kl: torch.Tensor  # Σ_m α_m KL(p‖q_m) (full) or the B.2 kl_approx (support)
    target_logprob: torch.Tensor  # log p[y]; 0 where there is no target


def _fail(field: str, message: str) -> KernelInputError:
    return KernelInputError(f"{field}: {message}")


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise _fail("logits", f"expected shape [N, V], got {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise _fail("logits", f"dtype must be float32/bfloat16/float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise _fail("logits", "vocabulary dimension V is 0")
    if logits.shape[0] > 0 and logits.stride(1) != 1:
        raise _fail("logits", "the vocabulary dimension must be contiguous (stride 1)")


def _stack_teachers(teacher_logprobs: torch.Tensor, n: int, width: int) -> torch.Tensor:
    if teacher_logprobs.dtype not in FLOAT_DTYPES:
        raise _fail("teacher_logprobs", f"dtype must be a float type, got {teacher_logprobs.dtype}")
    lq = teacher_logprobs.unsqueeze(0) if teacher_logprobs.dim() == 2 else teacher_logprobs
    if lq.dim() != 3 or lq.shape[1] != n or lq.shape[2] != width:
        raise _fail(
            "teacher_logprobs",
            f"expected [N, {width}] or [M, N, {width}] with N={n}, got {tuple(teacher_logprobs.shape)}",
        )
    if lq.shape[0] == 0:
        raise _fail("teacher_logprobs", "at least one teacher is needed (M=0)")
    return lq if lq.shape[1] == 0 or lq.stride(2) == 1 else lq.contiguous()


def _check_alpha(
    teacher_weights: torch.Tensor | Sequence[float] | None, m: int, device: torch.device
) -> torch.Tensor:
    if teacher_weights is None:
        return torch.ones(m, dtype=torch.float32, device=device)
    alpha = torch.as_tensor(teacher_weights, dtype=torch.float32).to(device)
    if alpha.shape != (m,):
        raise _fail("teacher_weights", f"expected shape [{m}] (one α per teacher), got {tuple(alpha.shape)}")
    if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
        raise _fail("teacher_weights", "every α_m must be finite and >= 0")
    return alpha.contiguous()


def _check_ids(ids: torch.Tensor, n: int, v: int) -> torch.Tensor:
    if ids.dtype not in INDEX_DTYPES:
        raise _fail("ids", f"dtype must be int64 or int32, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] == 0:
        raise _fail("ids", f"expected shape [N={n}, K>0], got {tuple(ids.shape)}")
    ids = ids.to(torch.int64).contiguous()
    if bool((ids >= v).any()):
        raise _fail("ids", f"ids must be < V={v} (negative ids are padding)")
    # Distinct ids matter: kl_approx would count a duplicate twice while the gradient is written once.
    srt = torch.sort(ids, dim=1).values
    if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
        raise _fail("ids", "the ids of a row must be distinct (padding < 0 may repeat)")
    return ids


def _check_targets(targets: torch.Tensor, n: int, v: int) -> torch.Tensor:
    if targets.dtype not in INDEX_DTYPES:
        raise _fail("targets", f"dtype must be int64 or int32, got {targets.dtype}")
    if targets.shape != (n,):
        raise _fail("targets", f"expected shape [N={n}], got {tuple(targets.shape)}")
    if bool((targets >= v).any()):
        raise _fail("targets", f"targets must be < V={v} (negative = ignored row)")
    return targets.to(torch.int64).contiguous()


@dataclass(frozen=True)
class SideInputs:
    """Checked arguments of a call other than the logits (shared with the fused LM-head op)."""

    teacher_logprobs: torch.Tensor  # (M, N, V) or (M, N, K), last dim contiguous
    alpha: torch.Tensor  # (M,) fp32
    ids: torch.Tensor | None  # (N, K) int64
    targets: torch.Tensor | None  # (N,) int64
    teacher_lse: torch.Tensor | None = None  # (M, N) fp32, see KernelInputs


def check_side_inputs(
    n: int,
    v: int,
    device: torch.device,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None,
    teacher_weights: torch.Tensor | Sequence[float] | None,
    targets: torch.Tensor | None,
    teacher_is_logits: bool = False,
) -> SideInputs:
    """Validate teachers, ids, α and targets for N rows over a vocabulary of V on `device`."""
    if teacher_is_logits and ids is not None:
        raise _fail(
            "teacher_is_logits",
            "teacher logits can only be normalised over the full vocabulary "
            "(ids=None); pass teacher log-probs at the support ids",
        )
    for name, tensor in (("teacher_logprobs", teacher_logprobs), ("ids", ids), ("targets", targets)):
        if tensor is not None and tensor.device != device:
            raise _fail(name, f"is on {tensor.device} but the student tensors are on {device}")
    checked_ids = None if ids is None else _check_ids(ids, n, v)
    width = v if checked_ids is None else checked_ids.shape[1]
    lq = _stack_teachers(teacher_logprobs, n, width)
    alpha = _check_alpha(teacher_weights, lq.shape[0], device)
    checked_targets = None if targets is None else _check_targets(targets, n, v)
    lse = teacher_logsumexp(lq) if teacher_is_logits else None
    return SideInputs(lq, alpha, checked_ids, checked_targets, lse)


def teacher_logsumexp(lq: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """(M, N) fp32 logsumexp of teacher logits (M, N, V), chunked so no fp32 [N, V] copy exists.

    A row of all −inf gets 0, so its log q stays −inf and is clamped to the floor downstream.
    """
    m, n, _ = lq.shape
    out = torch.empty(m, n, dtype=torch.float32, device=lq.device)
    for i in range(0, n, rows_per_chunk):
        out[:, i : i + rows_per_chunk] = torch.logsumexp(lq[:, i : i + rows_per_chunk].float(), dim=-1)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def check_inputs(
    logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ids: torch.Tensor | None,
    teacher_weights: torch.Tensor | Sequence[float] | None,
    targets: torch.Tensor | None,
    teacher_is_logits: bool = False,
) -> KernelInputs:
    """Validate one hybrid-loss call; raise `KernelInputError` naming the field on bad input."""
    _check_logits(logits)
    n, v = logits.shape
    side = check_side_inputs(
        n, v, logits.device, teacher_logprobs, ids, teacher_weights, targets, teacher_is_logits
    )
    return KernelInputs(logits, side.teacher_logprobs, side.alpha, side.ids, side.targets, side.teacher_lse)
