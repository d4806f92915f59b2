"""Triton kernels of the hybrid loss: one program per row, streaming over the vocabulary.

Owns the `_..._kernel` functions and their launchers `triton_forward` / `triton_backward`.
- full vocabulary forward: ONE pass with an online softmax that also carries the running
  Σ e_i(Σα·(z_i − m) − Σ_m α_m log q_{m,i}), rescaled when the max moves, so KL comes out without
  a second read (eq. 11 / 14).
- full vocabulary backward: one pass, ∇_z = g_kl·p⊙(Σα·log p − Σα_m log q_m − kl) + g_lp·(onehot − p).
- support forward: a logsumexp pass over the row, then a gather over the K ids (B.2).
- support backward: the K values first (into a small [N, K] scratch, so the in-place case reads the
  logits before overwriting them), then the dense row (zeros or −g_lp·p), then a scatter.
All accumulate in fp32 whatever the input dtype (fp32/bf16/fp16). Kernels are wrapped with
`triton.jit` lazily, at the first launch, so TRITON_INTERPRET=1 set at any time before that launch
selects triton's CPU interpreter (no import-time switching). Launched via `kernels.hybrid_loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.reference import LOGQ_FLOOR
from kernels.validation import KernelInputs, RowStats

# 4096 fp32 lanes per block: 16 values per thread at 8 warps keeps the tile in registers.
_MAX_BLOCK_V = 4096
_MAX_BLOCK_K = 256


def _full_forward_kernel(
    z_ptr,
    lq_ptr,
    lse_ptr,
    alpha_ptr,
    tgt_ptr,
    max_ptr,
    logsum_ptr,
    kl_ptr,
    tlp_ptr,
    V,
    stride_z,
    stride_lq_m,
    stride_lq_n,
    stride_lse_m,
    M,
    FLOOR: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    lq_row = lq_ptr + row * stride_lq_n
    a_sum = 0.0
    for t in range(M):
        a_sum += tl.load(alpha_ptr + t)
    m = float("-inf")
    s = 0.0
    u = 0.0  # Σ e_i (Σα·(z_i − ref) − Σα_m log q_{m,i}) relative to the current reference point
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        wlq = tl.zeros([BLOCK_V], dtype=tl.float32)
        lq_t = lq_row  # stepped pointer: t·stride could overflow int32 for large M·N·V
        for t in range(M):
            lq = tl.load(lq_t + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_LSE:  # teacher logits: log q = t − logsumexp(t)
                lq = lq - tl.load(lse_ptr + t * stride_lse_m + row)
            wlq += tl.load(alpha_ptr + t) * tl.maximum(lq, FLOOR)
            lq_t += stride_lq_m
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        ref_old = tl.where(m == float("-inf"), 0.0, m)
        rescale = tl.exp(m - ref_new)  # 0 while the row had only −inf so far
        shifted = z - ref_new
        e = tl.exp(shifted)
        # e = 0 lanes (−inf logits, the tail) use 0 for z − ref: never form 0·(−inf)
        term = e * (a_sum * tl.where(e > 0.0, shifted, 0.0) - wlq)
        u = (u - a_sum * (ref_new - ref_old) * s) * rescale + tl.sum(term, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    ref = tl.where(m == float("-inf"), 0.0, m)
    s_safe = tl.where(s > 0.0, s, 1.0)
    log_sum = tl.where(s > 0.0, tl.log(s_safe), float("inf"))
    kl = tl.where(s > 0.0, u / s_safe - a_sum * tl.log(s_safe), 0.0)
    tl.store(max_ptr + row, ref)
    tl.store(logsum_ptr + row, log_sum)
    tl.store(kl_ptr + row, kl)
    tlp = tl.zeros_like(kl)  # an fp32 tensor (not a Python float) for the store below
    if HAS_TARGETS:
        y = tl.load(tgt_ptr + row)
        zy = tl.load(z_row + y, mask=y >= 0, other=0.0).to(tl.float32)
        tlp = tl.where(y >= 0, (zy - ref) - log_sum, 0.0)
    tl.store(tlp_ptr + row, tlp)


def _full_backward_kernel(
    z_ptr,
    lq_ptr,
    lse_ptr,
    alpha_ptr,
    tgt_ptr,
    max_ptr,
    logsum_ptr,
    kl_ptr,
    gkl_ptr,
    glp_ptr,
    grad_ptr,
    V,
    stride_z,
    stride_g,
    stride_lq_m,
    stride_lq_n,
    stride_lse_m,
    M,
    FLOOR: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = grad_ptr + row * stride_g
    lq_row = lq_ptr + row * stride_lq_n
    ref = tl.load(max_ptr + row)
    log_sum = tl.load(logsum_ptr + row)
    kl = tl.load(kl_ptr + row)
    gkl = tl.load(gkl_ptr + row)
    a_sum = 0.0
    for t in range(M):
        a_sum += tl.load(alpha_ptr + t)
    y = -1
    glp = 0.0
    if HAS_TARGETS:
        y = tl.load(tgt_ptr + row)
        glp = tl.where(y >= 0, tl.load(glp_ptr + row), 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        wlq = tl.zeros([BLOCK_V], dtype=tl.float32)
        lq_t = lq_row  # stepped pointer: t·stride could overflow int32 for large M·N·V
        for t in range(M):
            lq = tl.load(lq_t + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_LSE:  # teacher logits: log q = t − logsumexp(t)
                lq = lq - tl.load(lse_ptr + t * stride_lse_m + row)
            wlq += tl.load(alpha_ptr + t) * tl.maximum(lq, FLOOR)
            lq_t += stride_lq_m
        logp = (z - ref) - log_sum
        p = tl.exp(logp)
        g = gkl * p * (a_sum * tl.where(p > 0.0, logp, 0.0) - wlq - kl)  # eq. 11 / 14
        if HAS_TARGETS:
            g += glp * (tl.where(offs == y, 1.0, 0.0) - p)
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


def _support_forward_kernel(
    z_ptr,
    lq_ptr,
    alpha_ptr,
    ids_ptr,
    tgt_ptr,
    max_ptr,
    logsum_ptr,
    kl_ptr,
    tlp_ptr,
    V,
    K,
    stride_z,
    stride_ids,
    stride_lq_m,
    stride_lq_n,
    M,
    FLOOR: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    ids_row = ids_ptr + row * stride_ids
    lq_row = lq_ptr + row * stride_lq_n
    a_sum = 0.0
    for t in range(M):
        a_sum += tl.load(alpha_ptr + t)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):  # the full-row softmax statistics: p is not renormalised
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - ref_new) + tl.sum(tl.exp(z - ref_new), axis=0)
        m = m_new
    ref = tl.where(m == float("-inf"), 0.0, m)
    log_sum = tl.where(s > 0.0, tl.log(tl.where(s > 0.0, s, 1.0)), float("inf"))
    acc = 0.0
    for kstart in range(0, K, BLOCK_K):  # kl_approx = Σ_S p(Σα log p − Σα_m log q_m), B.2
        offs_k = kstart + tl.arange(0, BLOCK_K)
        idx = tl.load(ids_row + offs_k, mask=offs_k < K, other=-1)
        valid = idx >= 0
        zs = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
        wlq = tl.zeros([BLOCK_K], dtype=tl.float32)
        lq_t = lq_row  # stepped pointer: t·stride could overflow int32 for large M·N·V
        for t in range(M):
            lq = tl.load(lq_t + offs_k, mask=valid, other=0.0).to(tl.float32)
            wlq += tl.load(alpha_ptr + t) * tl.maximum(lq, FLOOR)
            lq_t += stride_lq_m
        logp = (zs - ref) - log_sum
        p = tl.exp(logp)
        keep = valid & (p > 0.0)
        acc += tl.sum(tl.where(keep, p * (a_sum * tl.where(keep, logp, 0.0) - wlq), 0.0), axis=0)
    tl.store(max_ptr + row, ref)
    tl.store(logsum_ptr + row, log_sum)
    tl.store(kl_ptr + row, acc)
    tlp = tl.zeros_like(acc)  # an fp32 tensor (not a Python float) for the store below
    if HAS_TARGETS:
        y = tl.load(tgt_ptr + row)
        zy = tl.load(z_row + y, mask=y >= 0, other=0.0).to(tl.float32)
        tlp = tl.where(y >= 0, (zy - ref) - log_sum, 0.0)
    tl.store(tlp_ptr + row, tlp)


def _support_backward_kernel(
    z_ptr,
    lq_ptr,
    alpha_ptr,
    ids_ptr,
    tgt_ptr,
    max_ptr,
    logsum_ptr,
    kl_ptr,
    gkl_ptr,
    glp_ptr,
    grad_ptr,
    scratch_ptr,
    V,
    K,
    stride_z,
    stride_g,
    stride_ids,
    stride_lq_m,
    stride_lq_n,
    M,
    FLOOR: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    g_row = grad_ptr + row * stride_g
    ids_row = ids_ptr + row * stride_ids
    lq_row = lq_ptr + row * stride_lq_n
    sc_row = scratch_ptr + row * K
    ref = tl.load(max_ptr + row)
    log_sum = tl.load(logsum_ptr + row)
    kl = tl.load(kl_ptr + row)
    gkl = tl.load(gkl_ptr + row)
    a_sum = 0.0
    for t in range(M):
        a_sum += tl.load(alpha_ptr + t)
    y = -1
    glp = 0.0
    if HAS_TARGETS:
        y = tl.load(tgt_ptr + row)
        glp = tl.where(y >= 0, tl.load(glp_ptr + row), 0.0)
    for kstart in range(0, K, BLOCK_K):  # phase 1: values on S, read before any write to the row
        offs_k = kstart + tl.arange(0, BLOCK_K)
        idx = tl.load(ids_row + offs_k, mask=offs_k < K, other=-1)
        valid = idx >= 0
        zs = tl.load(z_row + idx, mask=valid, other=float("-inf")).to(tl.float32)
        wlq = tl.zeros([BLOCK_K], dtype=tl.float32)
        lq_t = lq_row  # stepped pointer: t·stride could overflow int32 for large M·N·V
        for t in range(M):
            lq = tl.load(lq_t + offs_k, mask=valid, other=0.0).to(tl.float32)
            wlq += tl.load(alpha_ptr + t) * tl.maximum(lq, FLOOR)
            lq_t += stride_lq_m
        logp = (zs - ref) - log_sum
        p = tl.exp(logp)
        keep = valid & (p > 0.0)
        val = tl.where(keep, gkl * p * (a_sum * tl.where(keep, logp, 0.0) - wlq - kl), 0.0)  # B.2
        if HAS_TARGETS:
            val += glp * (tl.where(idx == y, 1.0, 0.0) - p)
        tl.store(sc_row + offs_k, val, mask=valid)
    tl.debug_barrier()
    for start in range(0, V, BLOCK_V):  # phase 2: the dense part outside S
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_TARGETS:
            z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g = glp * (tl.where(offs == y, 1.0, 0.0) - tl.exp((z - ref) - log_sum))
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    for kstart in range(0, K, BLOCK_K):  # phase 3: overwrite S with its full value
        offs_k = kstart + tl.arange(0, BLOCK_K)
        idx = tl.load(ids_row + offs_k, mask=offs_k < K, other=-1)
        val = tl.load(sc_row + offs_k, mask=idx >= 0, other=0.0)
        tl.store(g_row + idx, val.to(grad_ptr.dtype.element_ty), mask=idx >= 0)


@functools.cache
def _compiled(fn: Callable[..., None], interpret: bool) -> Any:
    """`triton.jit` applied at first use; `interpret` keys the cache by the interpreter setting."""
    del interpret  # triton.jit reads TRITON_INTERPRET itself, now rather than at import
    return triton.jit(fn)


def _launch(fn: Callable[..., None], n: int, *args: Any, **meta: Any) -> None:
    from kernels.dense_kl import interpreter_enabled

    if n > 0:
        block = meta.get("BLOCK_V", 0)
        warps = 8 if block >= 2048 else 4
        _compiled(fn, interpreter_enabled())[(n,)](*args, num_warps=warps, **meta)


def _blocks(inp: KernelInputs, block_v: int | None) -> dict[str, int]:
    v = inp.logits.shape[1]
    meta = {"BLOCK_V": block_v or min(_MAX_BLOCK_V, triton.next_power_of_2(v))}
    if inp.ids is not None:
        meta["BLOCK_K"] = min(_MAX_BLOCK_K, triton.next_power_of_2(inp.ids.shape[1]))
    return meta


def _unused_pointer(inp: KernelInputs) -> torch.Tensor:
    # Triton needs a tensor for every pointer argument, even one a constexpr flag switches off.
    return inp.logits.new_zeros(1, dtype=torch.int64)


def _lse_args(inp: KernelInputs) -> tuple[torch.Tensor, int]:
    """Teacher row logsumexp (M, N) and its teacher stride, or an unused pointer when log-probs are given."""
    if inp.teacher_lse is None:
        return inp.logits.new_zeros(1, dtype=torch.float32), 0
    return inp.teacher_lse, inp.teacher_lse.stride(0)


def triton_forward(inp: KernelInputs, block_v: int | None = None) -> RowStats:
    """Row statistics, kl and target log-prob; block_v overrides the vocabulary tile (tests)."""
    z, lq = inp.logits, inp.teacher_logprobs
    n, v = z.shape
    out = [torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(4)]
    tgt = inp.targets if inp.targets is not None else _unused_pointer(inp)
    meta = _blocks(inp, block_v)
    common = dict(FLOOR=LOGQ_FLOOR, HAS_TARGETS=inp.targets is not None, **meta)
    if inp.ids is None:
        lse, lse_stride = _lse_args(inp)
        _launch(
            _full_forward_kernel,
            n,
            z,
            lq,
            lse,
            inp.alpha,
            tgt,
            *out,
            v,
            z.stride(0),
            lq.stride(0),
            lq.stride(1),
            lse_stride,
            lq.shape[0],
            HAS_LSE=inp.teacher_lse is not None,
            **common,
        )
    else:
        _launch(
            _support_forward_kernel,
            n,
            z,
            lq,
            inp.alpha,
            inp.ids,
            tgt,
            *out,
            v,
            inp.ids.shape[1],
            z.stride(0),
            inp.ids.stride(0),
            lq.stride(0),
            lq.stride(1),
            lq.shape[0],
            **common,
        )
    return RowStats(out[0], out[1], out[2], out[3])


def triton_backward(
    inp: KernelInputs,
    stats: RowStats,
    g_kl: torch.Tensor,
    g_lp: torch.Tensor,
    out: torch.Tensor,
    block_v: int | None = None,
) -> torch.Tensor:
    """Write ∇_z into `out` ((N, V), last dim contiguous; may be the logits themselves)."""
    z, lq = inp.logits, inp.teacher_logprobs
    n, v = z.shape
    tgt = inp.targets if inp.targets is not None else _unused_pointer(inp)
    meta = _blocks(inp, block_v)
    common = dict(FLOOR=LOGQ_FLOOR, HAS_TARGETS=inp.targets is not None, **meta)
    row_args = (stats.row_max, stats.log_sum, stats.kl, g_kl.float().contiguous(), g_lp.float().contiguous())
    if inp.ids is None:
        lse, lse_stride = _lse_args(inp)
        _launch(
            _full_backward_kernel,
            n,
            z,
            lq,
            lse,
            inp.alpha,
            tgt,
            *row_args,
            out,
            v,
            z.stride(0),
            out.stride(0),
            lq.stride(0),
            lq.stride(1),
            lse_stride,
            lq.shape[0],
            HAS_LSE=inp.teacher_lse is not None,
            **common,
        )
    else:
        k = inp.ids.shape[1]
        scratch = torch.empty(n, k, dtype=torch.float32, device=z.device)
        _launch(
            _support_backward_kernel,
            n,
            z,
            lq,
            inp.alpha,
            inp.ids,
            tgt,
            *row_args,
            out,
            scratch,
            v,
            k,
            z.stride(0),
            out.stride(0),
            inp.ids.stride(0),
            lq.stride(0),
            lq.stride(1),
            lq.shape[0],
            **common,
        )
    return out
