"""Fused torch path of the hybrid loss (CPU, or GPU without triton): chunked over rows.

Owns `torch_forward` and `torch_backward`. Both walk the rows in chunks so that only a few
[chunk, V] fp32 temporaries exist at a time (no N×V per-element loss tensor); the forward keeps
O(N) statistics (`RowStats`) and the backward recomputes p from them and writes ∇_z chunk by chunk,
optionally into the logits' own storage. Formulas: eq. 11 / eq. 14 (full vocabulary), appendix B.2
(support), plus the sparse term g_lp·(onehot(y) − p).
Full-vocabulary chunks first take a fast path built from torch's fused ops (log_softmax, kl_div,
addcmul: ~3 passes forward, ~6 backward, over a cache-resident chunk); a chunk where that is not
exact (student −inf logits, teacher values below the floor, non-finite results) is redone by the
careful path, which zeroes p = 0 terms explicitly. Called through `kernels.hybrid_loss`; tested by
`pytest tests/test_kernels_dense_kl.py`; measured by `python -m benchmarks.bench_dense_kl`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import LOGQ_FLOOR
from kernels.validation import KernelInputs, RowStats

# Elements per [chunk, V] fp32 temporary. One thread: 4 MiB stays in the last-level cache. Several
# threads: every op is an OpenMP fork/join, so fewer, 8 MiB chunks (benchmarks/bench_dense_kl on
# 2 quiet cores, V=32,000: 4 MiB 1.81x, 8 MiB 1.89-2.10x, 16 MiB 1.93x the naive path's speed).
_CHUNK_ELEMENTS = 1 << 20
_CHUNK_ELEMENTS_THREADED = 1 << 21
# exp(x) is exactly 0 in fp32 below −103.3, so clamping z − max at −200 leaves p, kl and ∇_z bit for
# bit unchanged while keeping every product p·(log p − …) finite (no 0·(−inf) → NaN, no where()).
_SHIFT_FLOOR = -200.0


def default_chunk_rows(vocab: int) -> int:
    budget = _CHUNK_ELEMENTS if torch.get_num_threads() == 1 else _CHUNK_ELEMENTS_THREADED
    return max(1, budget // max(vocab, 1))


def _teacher_logq(lq_m: torch.Tensor, lse_m: torch.Tensor | None) -> torch.Tensor:
    """max(log q, floor) of one teacher's chunk as a new fp32 tensor; logits are normalised first."""
    if lse_m is None:
        return torch.clamp(lq_m.float(), min=LOGQ_FLOOR)
    return torch.sub(lq_m.float(), lse_m.unsqueeze(1)).clamp_(min=LOGQ_FLOOR)


def _mean_logq(
    lq: torch.Tensor, alpha: torch.Tensor, a_sum: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_m α_m max(log q_m, floor) / Σα for one chunk, (M, c, X) → new (c, X) fp32 (eq. 14).

    Dividing by Σα lets one teacher skip the multiply; the caller scales back by Σα.
    lse (M, c): the teachers' row logsumexp when lq holds logits.
    """
    acc = _teacher_logq(lq[0], None if lse is None else lse[0])
    if lq.shape[0] == 1:
        return acc
    norm = a_sum if a_sum > 0 else 1.0  # Σα = 0: every use is multiplied by Σα = 0 anyway
    acc.mul_(float(alpha[0]) / norm)
    for m in range(1, lq.shape[0]):
        term = _teacher_logq(lq[m], None if lse is None else lse[m])
        acc.add_(term, alpha=float(alpha[m]) / norm)
    return acc


def _chunk_lse(inp: KernelInputs, rows: slice) -> torch.Tensor | None:
    return None if inp.teacher_lse is None else inp.teacher_lse[:, rows]


def _shifted(z: torch.Tensor, row_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_max, clamp(z − row_max, floor)) as a new fp32 tensor; row_max 0 for all −inf rows."""
    if row_max is None:
        row_max = z.amax(dim=1).float()
        row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    # always a new tensor (fp32 logits are subtracted out of place): the logits are never modified
    sh = z - row_max.unsqueeze(1) if z.dtype == torch.float32 else z.float().sub_(row_max.unsqueeze(1))
    return row_max, sh.clamp_(min=_SHIFT_FLOOR)


def _log_sum(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s.log(), torch.full_like(s, float("inf")))


def _target_logprob(
    z: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor, targets: torch.Tensor | None
) -> torch.Tensor:
    """log p[y] from the unclamped logit (a rare token keeps its exact, very negative log-prob)."""
    if targets is None:
        return torch.zeros_like(log_sum)
    zy = torch.gather(z, 1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
    picked = (zy - row_max) - log_sum
    return torch.where(targets >= 0, picked, torch.zeros_like(picked))


def _support_parts(
    sh: torch.Tensor,
    log_sum: torch.Tensor,
    ids: torch.Tensor,
    lq: torch.Tensor,
    alpha: torch.Tensor,
    a_sum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_S, log p_S − mean log q_S) on the support, zero on padding, (c, K) each."""
    valid = ids >= 0
    logp = torch.gather(sh, 1, ids.clamp(min=0)) - torch.where(
        torch.isinf(log_sum), torch.zeros_like(log_sum), log_sum
    ).unsqueeze(1)
    p = torch.where(valid & ~torch.isinf(log_sum).unsqueeze(1), logp.exp(), torch.zeros_like(logp))
    return p, logp.sub_(_mean_logq(lq, alpha, a_sum))


def _fast_logq(
    lq: torch.Tensor, alpha: torch.Tensor, a_sum: float, lse: torch.Tensor | None
) -> torch.Tensor | None:
    """Σα-normalised teacher term for the fused-op path, or None when one teacher needs clamping."""
    if lq.shape[0] > 1 or lse is not None:
        return _mean_logq(lq, alpha, a_sum, lse)
    one = lq[0].float()  # an alias for fp32: no copy
    # a read-only check is cheaper than a clamp pass; out-of-range rows take the careful path
    return one if one.numel() == 0 or bool(one.amin() >= LOGQ_FLOOR) else None


def _fast_forward_full(
    z: torch.Tensor, lq_bar: torch.Tensor, a_sum: float, targets: torch.Tensor | None
) -> tuple[torch.Tensor, ...] | None:
    """log_softmax → kl_div → row sum: three fused passes over a cache-resident chunk (eq. 11).

    Returns None when a row is not finite (student −inf logits, p underflowing against an extreme
    teacher value): the careful path then redoes the chunk with explicit zero-probability handling.
    """
    lp = torch.log_softmax(z.float(), dim=1)
    kl = F.kl_div(lq_bar, lp, reduction="none", log_target=True).sum(dim=1)
    if not bool(torch.isfinite(kl).all()):
        return None
    row_max = z.amax(dim=1).float()
    log_sum = -lp.amax(dim=1)  # log p at the argmax is exactly −log Σ exp(z − max)
    if targets is None:
        tlp = torch.zeros_like(kl)
    else:
        picked = lp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        tlp = torch.where(targets >= 0, picked, torch.zeros_like(picked))
    return row_max, log_sum, kl * a_sum, tlp


def _forward_chunk(inp: KernelInputs, rows: slice, a_sum: float) -> tuple[torch.Tensor, ...]:
    z = inp.logits[rows]  # (c, V)
    targets = None if inp.targets is None else inp.targets[rows]
    if inp.ids is None and a_sum > 0:
        lq_bar = _fast_logq(inp.teacher_logprobs[:, rows], inp.alpha, a_sum, _chunk_lse(inp, rows))
        fast = None if lq_bar is None else _fast_forward_full(z, lq_bar, a_sum, targets)
        if fast is not None:
            return fast
    row_max, sh = _shifted(z)
    lq = inp.teacher_logprobs[:, rows]  # (M, c, X)
    if inp.ids is None:
        e = sh.exp()
        s = e.sum(dim=1)
        log_sum = _log_sum(s)
        # kl = Σα · (Σ e·(sh − mean log q) / s − log s): one fused dot per row (eq. 11 / 14)
        lq_bar = _mean_logq(lq, inp.alpha, a_sum, _chunk_lse(inp, rows))
        dot = torch.linalg.vecdot(e, sh.sub_(lq_bar), dim=1)
        kl = torch.where(s > 0, a_sum * (dot / s.clamp(min=1e-30) - log_sum), torch.zeros_like(s))
    else:
        log_sum = _log_sum(sh.exp().sum(dim=1))
        p, diff = _support_parts(sh, log_sum, inp.ids[rows], lq, inp.alpha, a_sum)
        kl = a_sum * (p * diff).sum(dim=1)  # B.2 kl_approx on S, no renormalisation
    return row_max, log_sum, kl, _target_logprob(z, row_max, log_sum, targets)


def torch_forward(inp: KernelInputs, chunk_rows: int | None = None) -> RowStats:
    """Per-row KL (or kl_approx), target log-prob and softmax statistics, chunk by chunk."""
    n, v = inp.logits.shape
    step = chunk_rows or default_chunk_rows(v)
    a_sum = float(inp.alpha.sum())
    # results go straight into preallocated (N,) outputs: keeping per-chunk pieces alive between
    # the chunks' large temporaries fragments the C heap, which then keeps growing
    cols = [torch.empty(n, dtype=torch.float32, device=inp.logits.device) for _ in range(4)]
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        for col, part in zip(cols, _forward_chunk(inp, rows, a_sum), strict=True):
            col[rows] = part
    return RowStats(cols[0], cols[1], cols[2], cols[3])


def _add_onehot(grad: torch.Tensor, targets: torch.Tensor | None, g_lp: torch.Tensor) -> None:
    """grad[n, y_n] += g_lp[n]: the onehot half of the sparse term g_lp·(onehot(y) − p)."""
    if targets is not None:
        g = torch.where(targets >= 0, g_lp, torch.zeros_like(g_lp)).to(grad.dtype)
        grad.scatter_add_(1, targets.clamp(min=0).unsqueeze(1), g.unsqueeze(1))


def _fast_full_grad(
    inp: KernelInputs,
    stats: RowStats,
    gk: torch.Tensor,
    gl: torch.Tensor,
    rows: slice,
    a_sum: float,
    dest: torch.Tensor,
) -> torch.Tensor | None:
    """Fused-op twin of `_full_grad`; None (dest untouched) when the chunk needs the careful path."""
    lse = _chunk_lse(inp, rows)
    lq_bar = _fast_logq(inp.teacher_logprobs[:, rows], inp.alpha, a_sum, lse) if a_sum > 0 else None
    if lq_bar is None:
        return None
    lp = torch.log_softmax(inp.logits[rows].float(), dim=1)
    diff = torch.sub(lp, lq_bar)
    # one pass: diff ← −(g_kl·kl + g_lp) + diff·(g_kl·Σα), per-row scalars broadcast
    torch.addcmul(-(gk * stats.kl[rows] + gl).unsqueeze(1), diff, (gk * a_sum).unsqueeze(1), out=diff)
    # checked before dest (maybe the logits) is written; a sum is non-finite iff some entry is
    # (|diff| ≲ 1e4·|g|, far from fp32 overflow), and costs one read instead of isfinite's three
    if not bool(torch.isfinite(diff.sum())):
        return None
    p = lp.exp_()
    return torch.mul(p, diff, out=dest) if dest.dtype == torch.float32 else p.mul_(diff)


def _full_grad(
    inp: KernelInputs,
    stats: RowStats,
    gk: torch.Tensor,
    gl: torch.Tensor,
    rows: slice,
    a_sum: float,
    dest: torch.Tensor,
) -> torch.Tensor:
    """∇_z = p·(g_kl·Σα·(log p − mean log q) − (g_kl·kl + g_lp)) + g_lp·onehot (eq. 11 / 14)."""
    log_sum = stats.log_sum[rows]
    finite_ls = torch.where(torch.isinf(log_sum), torch.zeros_like(log_sum), log_sum)
    _, logp = _shifted(inp.logits[rows], stats.row_max[rows])
    logp.sub_(finite_ls.unsqueeze(1))
    p = logp.exp()
    diff = logp.sub_(_mean_logq(inp.teacher_logprobs[:, rows], inp.alpha, a_sum, _chunk_lse(inp, rows)))
    diff.mul_((gk * a_sum).unsqueeze(1)).sub_((gk * stats.kl[rows] + gl).unsqueeze(1))
    if dest.dtype == torch.float32:  # write straight into the output, saving a copy pass
        return torch.mul(p, diff, out=dest)
    return p.mul_(diff)


def _support_grad(
    inp: KernelInputs, stats: RowStats, gk: torch.Tensor, gl: torch.Tensor, rows: slice, a_sum: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(−g_lp·p over the whole row, or None without targets; the B.2 values on S)."""
    log_sum = stats.log_sum[rows]
    finite_ls = torch.where(torch.isinf(log_sum), torch.zeros_like(log_sum), log_sum)
    _, logp = _shifted(inp.logits[rows], stats.row_max[rows])
    assert inp.ids is not None
    ids = inp.ids[rows]
    p_s, diff = _support_parts(logp, log_sum, ids, inp.teacher_logprobs[:, rows], inp.alpha, a_sum)
    vals = p_s * diff.mul_((gk * a_sum).unsqueeze(1)).sub_((gk * stats.kl[rows]).unsqueeze(1))
    if inp.targets is None:
        return None, vals
    dense = logp.sub_(finite_ls.unsqueeze(1)).exp_().mul_(-gl.unsqueeze(1))  # −g_lp·p, S included
    return dense, vals


def torch_backward(
    inp: KernelInputs,
    stats: RowStats,
    g_kl: torch.Tensor,
    g_lp: torch.Tensor,
    out: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Write ∇_z = g_kl·(dense term) + g_lp·(onehot(y) − p) into `out` (may alias the logits)."""
    n, v = inp.logits.shape
    step = chunk_rows or default_chunk_rows(v)
    a_sum = float(inp.alpha.sum())
    g_kl, g_lp = g_kl.float(), g_lp.float()
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        targets = None if inp.targets is None else inp.targets[rows]
        # rows without a target (y < 0) carry no sparse term at all
        gl = torch.zeros_like(g_lp[rows]) if targets is None else torch.where(targets >= 0, g_lp[rows], 0.0)
        if inp.ids is None:
            grad = _fast_full_grad(inp, stats, g_kl[rows], gl, rows, a_sum, out[rows])
            if grad is None:
                grad = _full_grad(inp, stats, g_kl[rows], gl, rows, a_sum, out[rows])
        else:
            dense, vals = _support_grad(inp, stats, g_kl[rows], gl, rows, a_sum)
            grad = dense if dense is not None else out[rows].zero_()  # logits already read
            ids = inp.ids[rows]
            grad.scatter_add_(1, ids.clamp(min=0), torch.where(ids >= 0, vals, 0.0).to(grad.dtype))
        _add_onehot(grad, targets, gl)
        if grad.data_ptr() != out[rows].data_ptr():
            out[rows].copy_(grad)  # the chunk's logits were already read into fp32 temporaries
    return out
