"""The hybrid distillation objective of seed 000 (eqs. 2, 6, 12, 14, 15, Theorem 1, Algorithm 1).

Owns the config of the objective and the pure tensor functions that turn one batch of on-policy
responses into a surrogate loss whose gradient is Dense + Sparse (Theorem 1, eq. 7):

    c_t     = Σ_m α_m [log π_θ(y_t) − log π_m(y_t)]                          (eq. 2, 14)
    G_{t+1} = Σ_{k=t+1..T} γ^{k−t} c_k − Σ_n λ_n r_n                          (eq. 12, 15)
    loss    = norm · Σ_{b,t} [ Σ_m α_m D(π_θ(·|ctx), π_m(·|ctx))              (Dense, eq. 14)
                               + stopgrad(G_{t+1} − baseline) · log π_θ(y_t) ]  (Sparse)

with D the dense divergence (reverse KL by default: then the Dense term is the token-level KL
gradient of Prop. 4). Costs inside G use the student log-probs DETACHED: G only weights the
score function. ``norm`` is 1/B (``sum_over_k``: Algorithm 1 line 18 — sum over (response, step),
divide by the group size K; with P prompts of K responses in a batch, B = P·K, so the per-prompt
gradients are averaged) or 1/#tokens (``per_token_mean``, named as such because it is not the
seed's). Special cases from the same code (table 5.5): γ=0, λ=0 → dense only (on-policy KD);
γ=0, λ>0 → dense + reward through the sparse term; γ=1 → full-trajectory KL + reward; no teacher
(M=0) → costs 0, no dense term: pure REINFORCE on the rewards.

Optional per-token weights w_t of the dense term (stop-gradient, ``learner.token_weights``; off by
default, and then the loss is computed exactly as without them): Σ_m α_m D becomes w_t · Σ_m α_m D
with w_t the token importance of seed 002 ch. 7 (as a weight, or 0/1 by a threshold) times
SelecTKD's 1 / β (seed 001). The sparse term and the costs c_t are unweighted; ``kl_mean`` stays
the unweighted mean divergence.

What the estimator is the gradient of (tests/test_theorem1.py checks each by enumeration):
γ=1: exactly ∇J of eq. 3. γ<1: Σ_t ∂/∂θ_t E[Σ_{k≥t} γ^{k−t} c_k − λ r] with θ_t the copy of θ used
at step t (the γ-discounted cost-to-go, differentiated one step at a time); γ=0: the gradient of
Σ_t E_{ctx_t fixed}[KL_t] − λ E[r].

Tests: ``.venv/bin/pytest tests/test_objective*.py tests/test_theorem1.py -q``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from learner import divergences, token_weights
from learner.baselines import leave_one_out_baseline

__all__ = [
    "ObjectiveBatch",
    "ObjectiveConfig",
    "ObjectiveError",
    "ObjectiveOutput",
    "discounted_returns",
    "objective_loss",
    "token_costs",
]

Baseline = Literal["none", "leave_one_out"]
Normalization = Literal["sum_over_k", "per_token_mean"]
TokenImportance = Literal["off", "weight", "threshold"]
Selective = Literal["off", "greedy_top_k", "spec_k"]
BASELINES: tuple[str, ...] = ("none", "leave_one_out")
NORMALIZATIONS: tuple[str, ...] = ("sum_over_k", "per_token_mean")
TOKEN_IMPORTANCE: tuple[str, ...] = ("off", "weight", "threshold")
SELECTIVE: tuple[str, ...] = ("off", "greedy_top_k", "spec_k")


class ObjectiveError(ValueError):
    """Bad objective config or batch; the message names the field. Nothing is computed."""


@dataclass(frozen=True)
class ObjectiveConfig:
    # γ ∈ [0, 1] of eq. 12: weight γ^{k−t} of the future cost c_k in G_{t+1}. 1 = the exact
    # gradient of eq. 3 (Theorem 1); smaller trades bias for variance; 0 (the run spec's
    # default) = on-policy KD + terminal reward, no future KL in G (table 5.5).
    gamma: float = 0.0
    # Divergence of the dense term, a name in learner.divergences (reverse_kl = the seed's).
    divergence: str = "reverse_kl"
    # Parameters of that divergence, e.g. {"beta": 0.5} for jsd.
    divergence_params: Mapping[str, float] = field(default_factory=dict)
    # Baseline subtracted from G_{t+1} in the sparse term: none, or the leave-one-out mean over
    # the other responses to the same prompt (learner.baselines; unbiased).
    baseline: Baseline = "none"
    # sum_over_k: Σ over (response, step) / #responses (Algorithm 1); per_token_mean: / #tokens.
    normalization: Normalization = "sum_over_k"
    # α_m ≥ 0, one per teacher, in the order of the batch's teacher axis. () = no teacher (pure RL).
    teacher_weights: tuple[float, ...] = (1.0,)
    # Names of the rewards r_n, in the column order of ObjectiveBatch.rewards; λ_n per name.
    reward_names: tuple[str, ...] = ()
    # Token importance (seed 002 ch. 7): w_t = (1 − H_teacher/log V)·KL(teacher‖student) multiplies
    # the dense term ("weight"), or keeps it where w_t >= the threshold ("threshold").
    token_importance: TokenImportance = "off"
    token_importance_threshold: float = 0.3
    # SelecTKD (seed 001): dense term × 1 at accepted positions, × selective_beta at rejected ones.
    selective: Selective = "off"
    selective_k: int = 5
    selective_beta: float = 0.01

    def __post_init__(self) -> None:
        _check_config(self)
        _check_token_weights(self)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_token_weights(cfg: ObjectiveConfig) -> None:
    if cfg.token_importance not in TOKEN_IMPORTANCE:
        raise _fail("token_importance", f"unknown {cfg.token_importance!r}; valid: {list(TOKEN_IMPORTANCE)}")
    threshold = cfg.token_importance_threshold
    if not _number(threshold) or threshold < 0:
        raise _fail("token_importance_threshold", f"must be finite and >= 0, got {threshold!r}")
    if cfg.selective not in SELECTIVE:
        raise _fail("selective", f"unknown {cfg.selective!r}; valid: {list(SELECTIVE)}")
    k = cfg.selective_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _fail("selective_k", f"must be an integer >= 1, got {k!r}")
    if not _number(cfg.selective_beta) or not 0.0 <= cfg.selective_beta <= 1.0:
        raise _fail("selective_beta", f"must be a number in [0, 1], got {cfg.selective_beta!r}")


def _check_config(cfg: ObjectiveConfig) -> None:
    g = cfg.gamma
    if isinstance(g, bool) or not isinstance(g, int | float) or not 0.0 <= g <= 1.0:
        raise ObjectiveError(f"gamma: must be a number in [0, 1], got {g!r}")
    try:
        divergences.check_divergence_params(cfg.divergence, cfg.divergence_params)
    except divergences.DivergenceError as exc:
        raise ObjectiveError(str(exc)) from exc
    if cfg.baseline not in BASELINES:
        raise ObjectiveError(f"baseline: unknown {cfg.baseline!r}; valid: {list(BASELINES)}")
    if cfg.normalization not in NORMALIZATIONS:
        raise ObjectiveError(f"normalization: unknown {cfg.normalization!r}; valid: {list(NORMALIZATIONS)}")
    for i, a in enumerate(cfg.teacher_weights):
        if isinstance(a, bool) or not isinstance(a, int | float) or not (math.isfinite(a) and a >= 0):
            raise ObjectiveError(f"teacher_weights[{i}]: must be finite and >= 0, got {a!r}")
    if len(set(cfg.reward_names)) != len(cfg.reward_names):
        raise ObjectiveError(f"reward_names: duplicates in {list(cfg.reward_names)}")


@dataclass
class ObjectiveBatch:
    """One batch of B on-policy responses, right-padded to T; M teachers, N rewards."""

    logits: Tensor  # (B, T, V) student logits predicting y_t, with grad
    tokens: Tensor  # (B, T) int64 sampled y_t; ignored where mask is False
    mask: Tensor  # (B, T) bool, True on the response's tokens (a prefix of each row)
    teacher_token_logprobs: Tensor  # (M, B, T) log π_m(y_t | x, y<t)
    teacher_logprobs: Tensor | None  # (M, B, T, V) full vocab, or (M, B, T, K) at support_ids
    support_ids: Tensor | None  # (B, T, K) int64 support of the dense term (< 0 = padding)
    rewards: Tensor  # (B, N) r_n(x, y), columns in ObjectiveConfig.reward_names order
    group_ids: Tensor  # (B,) int64, equal for responses to the same prompt
    # Each teacher's top-K' ids and log-probs (M, B, T, K'), any order: SelecTKD's greedy_top_k
    # checks against them when the dense support is not the full vocabulary.
    teacher_top_ids: Tensor | None = None
    teacher_top_logprobs: Tensor | None = None
    # (B,) bool, False for responses not sampled from the student (the dataset's reference,
    # sampling.on_policy_fraction, seed 002 ch. 4): the sparse score-function term assumes
    # y ~ π_θ, so it skips them; the dense term applies to every row. None: all on-policy.
    on_policy: Tensor | None = None


@dataclass(frozen=True)
class ObjectiveOutput:
    """The loss (backward this) and its parts, detached, for logging."""

    loss: Tensor  # () dense + sparse surrogate
    dense: Tensor  # () normalized Σ α·D over tokens
    sparse: Tensor  # () normalized Σ stopgrad(G − b)·log π(y_t) (only its gradient means much)
    kl_mean: Tensor  # () mean per-token dense divergence
    cost_mean: Tensor  # () mean per-token cost c_t
    return_mean: Tensor  # () mean G_{t+1} over tokens
    advantage_std: Tensor  # () std of G_{t+1} − baseline over tokens
    num_tokens: int
    num_responses: int
    # Metrics of the options that are on, () each: token_importance_mean / token_importance_kept,
    # selectkd_accept_rate, kl_mix_forward_kl / kl_mix_reverse_kl (means over the response tokens).
    extras: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------- pure tensor functions


def token_costs(student_lp: Tensor, teacher_lp: Tensor, alphas: Tensor, mask: Tensor) -> Tensor:
    """c_t = Σ_m α_m [log π_θ(y_t) − log π_m(y_t)] (eq. 2, 14); 0 off the mask.

    student_lp (B, T), teacher_lp (M, B, T), alphas (M,), mask (B, T) bool → (B, T).
    M = 0 (no teacher) gives zeros.
    """
    dtype = torch.promote_types(student_lp.dtype, torch.float32)
    alphas = alphas.to(device=student_lp.device, dtype=dtype)
    cost = alphas.sum() * student_lp.to(dtype) - torch.einsum("m,mbt->bt", alphas, teacher_lp.to(dtype))
    # where, not multiply: padding may hold garbage (nan/inf) that 0·x would propagate.
    return torch.where(mask, cost, torch.zeros_like(cost))


def discounted_returns(
    costs: Tensor, mask: Tensor, rewards: Tensor, lambdas: Tensor, gamma: float, block: int = 64
) -> Tensor:
    """G_{t+1} = Σ_{k=t+1..T_b} γ^{k−t} c_k − Σ_n λ_n r_n (eq. 12, 15; exponent k−t, Remark 2).

    costs (B, T), mask (B, T) bool, rewards (B, N), lambdas (N,) → (B, T). Past a response's end
    the value is that of an empty future, −Σ_n λ_n r_n. Computed as H_t = Σ_{k≥t} γ^{k−t} c_k by
    a blocked reverse scan — within blocks of ``block`` steps a triangular matrix of γ^{j−i} ∈
    [0, 1], across blocks a carry — so it is O(B·T·block), vectorized, and never divides by a
    power of γ (safe for γ → 0 and γ = 1; 0^0 = 1). Then G_{t+1} = γ H_{t+1} − Σ λ r.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ObjectiveError(f"gamma: must be in [0, 1], got {gamma!r}")
    if block < 1:
        raise ObjectiveError(f"block: must be >= 1, got {block}")
    b, t = costs.shape
    dtype = torch.promote_types(costs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=costs.device)
    c = torch.where(mask, costs.to(dtype), zero)
    nb = -(-t // block) if t else 0
    c = torch.nn.functional.pad(c, (0, nb * block - t)).view(b, nb, block)
    idx = torch.arange(block, device=costs.device)
    lag = idx[None, :] - idx[:, None]  # (i, j) → j − i
    g = torch.tensor(gamma, dtype=dtype, device=costs.device)
    tri = torch.where(lag >= 0, g ** lag.clamp(min=0).to(dtype), zero)
    local = torch.einsum("bkj,ij->bki", c, tri)  # within-block suffix sums
    carry_w = g ** (block - idx).to(dtype)  # γ^{block − i}: from next block's start to step i
    h = torch.empty_like(local)
    carry = torch.zeros(b, dtype=dtype, device=costs.device)
    for k in range(nb - 1, -1, -1):
        h[:, k] = local[:, k] + carry_w * carry[:, None]
        carry = h[:, k, 0]
    h = h.reshape(b, nb * block)[:, :t]
    future = gamma * torch.nn.functional.pad(h[:, 1:], (0, 1))  # γ H_{t+1}, 0 after T
    reward_term = rewards.to(dtype) @ lambdas.to(device=costs.device, dtype=dtype)  # (B,)
    return future - reward_term[:, None]


# -------------------------------------------------------------------------- the loss


def objective_loss(
    cfg: ObjectiveConfig, batch: ObjectiveBatch, lambdas: Sequence[float] | Tensor
) -> ObjectiveOutput:
    """The Dense + Sparse surrogate of Theorem 1 for one batch; ``lambdas`` (N,) are the current
    λ_n, in ``cfg.reward_names`` order (see contracts.schedules)."""
    lam = _check_batch(cfg, batch, lambdas)
    bsz = batch.logits.shape[0]
    mask = batch.mask
    div, target_lp, extras = _dense_terms(cfg, batch)  # (B, T) each, differentiable
    alphas = torch.tensor(cfg.teacher_weights, dtype=torch.float32)
    costs = token_costs(target_lp.detach(), batch.teacher_token_logprobs, alphas, mask)
    returns = discounted_returns(costs, mask, batch.rewards, lam, cfg.gamma)
    if cfg.baseline == "leave_one_out":
        returns_b = returns - leave_one_out_baseline(returns, batch.group_ids)
    else:
        returns_b = returns
    sparse_mask = mask if batch.on_policy is None else mask & batch.on_policy.to(mask.device)[:, None]
    adv = torch.where(sparse_mask, returns_b, torch.zeros_like(returns_b)).detach()
    n_tok = int(mask.sum())
    norm = 1.0 / bsz if cfg.normalization == "sum_over_k" else 1.0 / max(n_tok, 1)
    weight = _dense_weights(cfg, batch, extras)  # None when no option weights the dense term
    weighted = div if weight is None else div * weight
    dense = torch.where(mask, weighted, torch.zeros_like(weighted)).sum() * norm
    sparse = (adv * target_lp).sum() * norm
    return ObjectiveOutput(
        loss=dense + sparse,
        dense=dense.detach(),
        sparse=sparse.detach(),
        kl_mean=_masked_mean(div.detach(), mask),
        cost_mean=_masked_mean(costs, mask),
        return_mean=_masked_mean(returns, mask),
        advantage_std=_masked_std(adv, sparse_mask),
        num_tokens=n_tok,
        num_responses=bsz,
        extras={name: _masked_mean(x, mask) for name, x in extras.items()},
    )


def _dense_terms(cfg: ObjectiveConfig, batch: ObjectiveBatch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(B, T) dense divergence (0 without teachers) and (B, T) log π_θ(y_t), both with grad, and
    the divergence's named parts (B, T), detached, as ``kl_mix_<part>`` metrics."""
    bsz, t, v = batch.logits.shape
    logits = batch.logits.reshape(bsz * t, v)  # a view when contiguous: no (N, V) copy
    targets = torch.where(batch.mask, batch.tokens, -1).reshape(-1)
    if not cfg.teacher_weights:
        target_lp = divergences.target_logprobs(logits, targets)
        return torch.zeros_like(target_lp).view(bsz, t), target_lp.view(bsz, t), {}
    teacher, ids = _dense_teacher(batch)
    fn = divergences.get_divergence(cfg.divergence)
    weights = torch.tensor(cfg.teacher_weights, dtype=torch.float32, device=logits.device)
    out = fn(logits, teacher, weights=weights, ids=ids, targets=targets, **cfg.divergence_params)
    parts = {f"{cfg.divergence}_{name}": x.view(bsz, t) for name, x in out.parts.items()}
    return out.div.view(bsz, t), out.target_logprob.view(bsz, t), parts


def _dense_weights(cfg: ObjectiveConfig, batch: ObjectiveBatch, extras: dict[str, Tensor]) -> Tensor | None:
    """(B, T) stop-gradient weights of the dense term (learner.token_weights), or None when every
    option is off (or there is no teacher); adds the options' per-token metrics to ``extras``."""
    if not cfg.teacher_weights or (cfg.token_importance == "off" and cfg.selective == "off"):
        return None
    bsz, t, v = batch.logits.shape
    logits = batch.logits.detach().reshape(bsz * t, v)
    teacher, ids = _dense_teacher(batch)
    weight = torch.ones(bsz * t, dtype=torch.float32, device=logits.device)
    if cfg.token_importance != "off":
        alphas = torch.tensor(cfg.teacher_weights, dtype=torch.float32)
        score = token_weights.importance_scores(logits, teacher, ids, alphas)
        keep = score >= cfg.token_importance_threshold
        weight = weight * (score if cfg.token_importance == "weight" else keep.float())
        kept = keep if cfg.token_importance == "threshold" else score > 0
        extras["token_importance_mean"] = score.view(bsz, t)
        extras["token_importance_kept"] = kept.float().view(bsz, t)
    if cfg.selective != "off":
        accepted = _selective_accept(cfg, batch, logits, teacher, ids)
        weight = weight * torch.where(accepted, 1.0, cfg.selective_beta)
        extras["selectkd_accept_rate"] = accepted.float().view(bsz, t)
    return weight.view(bsz, t)


def _selective_accept(
    cfg: ObjectiveConfig, batch: ObjectiveBatch, logits: Tensor, teacher: Tensor, ids: Tensor | None
) -> Tensor:
    """(B·T,) bool: SelecTKD's verification (seed 001) at every position."""
    if cfg.selective == "spec_k":
        return token_weights.spec_k_accept(logits, teacher, ids, cfg.selective_k)
    if ids is None:
        return token_weights.greedy_top_k_accept(logits, teacher, cfg.selective_k)
    assert batch.teacher_top_ids is not None and batch.teacher_top_logprobs is not None  # _check_batch
    m, bsz, t, width = batch.teacher_top_ids.shape
    top_ids = batch.teacher_top_ids.reshape(m, bsz * t, width)
    top_lp = batch.teacher_top_logprobs.reshape(m, bsz * t, width)
    return token_weights.greedy_top_k_accept(logits, teacher, cfg.selective_k, top_ids, top_lp)


def _dense_teacher(batch: ObjectiveBatch) -> tuple[Tensor, Tensor | None]:
    """Teacher log-probs (M, B·T, V|K) and ids (B·T, K) with padding rows made harmless."""
    assert batch.teacher_logprobs is not None  # _check_batch guarantees it
    m, bsz, t, width = batch.teacher_logprobs.shape
    teacher = batch.teacher_logprobs
    ids = batch.support_ids
    if ids is not None:
        # Padding rows get an all-padding support: their divergence is exactly 0.
        ids = torch.where(batch.mask[..., None], ids, -1).reshape(bsz * t, -1)
    elif not bool(batch.mask.all()):
        # Padding rows may hold anything; a constant row keeps their (zero-weighted) KL finite.
        teacher = torch.where(batch.mask[None, ..., None], teacher, 0.0)
    return teacher.reshape(m, bsz * t, width), ids


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum().clamp(min=1)
    return (torch.where(mask, x, torch.zeros_like(x)).sum() / n).detach()


def _masked_std(x: Tensor, mask: Tensor) -> Tensor:
    mean = _masked_mean(x, mask)
    return _masked_mean((x - mean) ** 2, mask).sqrt()


# ------------------------------------------------------------------------- validation


def _fail(name: str, message: str) -> ObjectiveError:
    return ObjectiveError(f"{name}: {message}")


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise _fail(name, f"expected shape {shape}, got {tuple(x.shape)}")


def _check_batch(cfg: ObjectiveConfig, batch: ObjectiveBatch, lambdas: Sequence[float] | Tensor) -> Tensor:
    """Validate ``batch`` against ``cfg``; return λ as a (N,) float tensor."""
    if batch.logits.dim() != 3 or not batch.logits.is_floating_point():
        raise _fail("logits", f"expected float (B, T, V), got {tuple(batch.logits.shape)}")
    bsz, t, v = batch.logits.shape
    if bsz == 0 or t == 0:
        raise _fail("logits", "empty batch")
    m, n = len(cfg.teacher_weights), len(cfg.reward_names)
    _check_shape("mask", batch.mask, (bsz, t))
    if batch.mask.dtype != torch.bool:
        raise _fail("mask", f"dtype must be bool, got {batch.mask.dtype}")
    if bool((batch.mask[:, 1:] & ~batch.mask[:, :-1]).any()):
        raise _fail("mask", "each row must be a prefix of True (right padding)")
    _check_tokens(batch, v)
    _check_shape("teacher_token_logprobs", batch.teacher_token_logprobs, (m, bsz, t))
    _check_finite("teacher_token_logprobs", batch.teacher_token_logprobs, batch.mask)
    _check_dense_teacher(batch, m, bsz, t, v)
    _check_selective_inputs(cfg, batch, m, v)
    _check_shape("rewards", batch.rewards, (bsz, n))
    if not bool(torch.isfinite(batch.rewards).all()):
        raise _fail("rewards", "must be finite")
    _check_shape("group_ids", batch.group_ids, (bsz,))
    if batch.group_ids.is_floating_point():
        raise _fail("group_ids", "must be an integer tensor")
    _check_on_policy(batch.on_policy, bsz)
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lam.shape != (n,):
        raise _fail("lambdas", f"expected {n} values (one per reward), got {lam.numel()}")
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise _fail("lambdas", "every λ_n must be finite and >= 0")
    return lam


def _check_on_policy(on_policy: Tensor | None, bsz: int) -> None:
    if on_policy is not None and (tuple(on_policy.shape) != (bsz,) or on_policy.dtype != torch.bool):
        raise _fail("on_policy", f"expected bool (B={bsz},), got {on_policy.dtype} {tuple(on_policy.shape)}")


def _check_tokens(batch: ObjectiveBatch, v: int) -> None:
    _check_shape("tokens", batch.tokens, tuple(batch.mask.shape))
    if batch.tokens.is_floating_point():
        raise _fail("tokens", "must be an integer tensor")
    on = batch.tokens[batch.mask]
    if on.numel() and (int(on.min()) < 0 or int(on.max()) >= v):
        raise _fail("tokens", f"ids on the mask must be in [0, {v})")


def _check_finite(name: str, x: Tensor, mask: Tensor) -> None:
    if not bool(torch.isfinite(x[:, mask]).all()):
        raise _fail(name, "must be finite on the response tokens")


def _check_dense_teacher(batch: ObjectiveBatch, m: int, bsz: int, t: int, v: int) -> None:
    if m == 0:
        if batch.teacher_logprobs is not None or batch.support_ids is not None:
            raise _fail("teacher_logprobs", "given but the config has no teacher")
        return
    if batch.teacher_logprobs is None:
        raise _fail("teacher_logprobs", "required when the config has teachers")
    ids = batch.support_ids
    if ids is None:
        _check_shape("teacher_logprobs", batch.teacher_logprobs, (m, bsz, t, v))
        return
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (bsz, t) or ids.is_floating_point():
        raise _fail("support_ids", f"expected int (B={bsz}, T={t}, K), got {tuple(ids.shape)}")
    on = ids[batch.mask]
    if on.numel() and int(on.max()) >= v:
        raise _fail("support_ids", f"ids on the mask must be < vocab size {v} (< 0 = padding)")
    _check_shape("teacher_logprobs", batch.teacher_logprobs, (m, bsz, t, ids.shape[2]))


def _check_selective_inputs(cfg: ObjectiveConfig, batch: ObjectiveBatch, m: int, v: int) -> None:
    """greedy_top_k needs the teacher's top-k: the full vocabulary, or top lists of >= k entries."""
    if cfg.selective != "greedy_top_k" or m == 0:
        return
    k = cfg.selective_k
    if batch.support_ids is None:
        if k > v:
            raise _fail("selective_k", f"{k} exceeds the vocabulary size {v}")
        return
    ids, lp = batch.teacher_top_ids, batch.teacher_top_logprobs
    if ids is None or lp is None:
        raise _fail("teacher_top_ids", "greedy_top_k on a top-K support needs each teacher's top-K list")
    bsz, t = batch.mask.shape
    if ids.dim() != 4 or tuple(ids.shape[:3]) != (m, bsz, t) or ids.is_floating_point():
        raise _fail("teacher_top_ids", f"expected int (M={m}, B={bsz}, T={t}, K), got {tuple(ids.shape)}")
    _check_shape("teacher_top_logprobs", lp, tuple(ids.shape))
    if ids.shape[-1] < k:
        raise _fail("selective_k", f"{k} exceeds the teachers' top-K lists of {ids.shape[-1]} (top_k)")
