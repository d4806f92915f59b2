"""Theorem 1 of seed 000 end to end, on a tabular softmax policy small enough to enumerate.

The world: vocabulary {0 = EOS, 1, 2}, horizon T = 3 (a response ends at EOS or after T tokens:
15 responses), a tabular student with one row of logits per context (prefix), M = 2 tabular
teachers with weights α, N = 2 rewards with weights λ. Everything exact is computed in float64 by
enumerating all 15 responses (225 pairs for the baseline); the learner's ``objective_loss`` runs
in float32 (the reverse-KL kernel's precision), hence the 2e-5 tolerances.

What is asserted (g_γ = the gradient of the learner's loss on one response, K = 1):
- γ = 1:  E[g_1] = ∇J, J of eq. 3 (exactly, up to float32 rounding).
- any γ:  E[g_γ] = Σ_t ∂/∂θ_t J_γ^{(t)}, J_γ^{(t)} = E[Σ_{k≥t} γ^{k−t} c_k − Σ_n λ_n r_n], θ_t the
          copy of θ used at step t (the tabular policy's step-t rows). For γ < 1 this differs
          from ∇J (the discounted estimator is biased for eq. 3) and from ∇J_γ^{(0)} (it is not
          the gradient of the textbook discounted objective E[Σ_k γ^k c_k] − λ E[r] either).
- γ = 0:  E[g_0] = ∇_θ [Σ_t E_{ctx_t ~ d_t(θ0)} Σ_m α_m KL(π_θ(·|ctx_t) ‖ π_m(·|ctx_t))
          − Σ_n λ_n E_{y~π_θ}[r_n]] at θ = θ0: per-step KL gradients with the context
          distribution (the future) held fixed, plus the exact reward gradient.
- the leave-one-out baseline leaves E[g] unchanged (K = 2, all 225 pairs enumerated).
- Monte Carlo: the learner's loss on 12,000 sampled responses (fixed seed) lands within
  5 standard errors (estimated from 24 independent sub-batches) + 1e-3 of the exact E[g_γ] and
  within 10% in relative L2 norm.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from learner.objective import ObjectiveBatch, ObjectiveConfig, objective_loss

F64 = torch.float64
V, T, EOS = 3, 3, 0
ALPHAS = (0.7, 0.5)
REWARD_SCALE = (1.0, 0.5)  # λ_n = λ · REWARD_SCALE[n]


@dataclass(frozen=True)
class World:
    contexts: list[tuple[int, ...]]  # every prefix that can be extended
    ctx_index: dict[tuple[int, ...], int]
    responses: list[tuple[int, ...]]  # all 15 complete responses
    theta: torch.Tensor  # (C, V) student logits per context, float64
    teacher_lp: torch.Tensor  # (M, C, V) teacher log-probs per context
    rewards: torch.Tensor  # (R, N) reward table per response


def make_world(seed: int = 0) -> World:
    contexts = [p for n in range(T) for p in itertools.product((1, 2), repeat=n)]
    responses = [(*p, EOS) for p in contexts] + [(*p, a) for p in contexts if len(p) == T - 1 for a in (1, 2)]
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(len(contexts), V, generator=gen, dtype=F64)
    teacher = torch.randn(len(ALPHAS), len(contexts), V, generator=gen, dtype=F64) * 1.5
    rewards = torch.rand(len(responses), len(REWARD_SCALE), generator=gen, dtype=F64)
    return World(
        contexts,
        {c: i for i, c in enumerate(contexts)},
        responses,
        theta,
        teacher.log_softmax(-1),
        rewards,
    )


def lambdas(lam: float) -> list[float]:
    return [lam * s for s in REWARD_SCALE]


# ------------------------------------------------------------------ exact float64 quantities


def _steps(w: World, y: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(context id, token)] for the steps of response y."""
    return [(w.ctx_index[y[:t]], y[t]) for t in range(len(y))]


def _seq_terms(w: World, theta: torch.Tensor, y: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """log π_θ(y) and the costs c_t (eq. 2, 14) of response y."""
    lp = theta.log_softmax(-1)
    logp = theta.new_zeros(())
    costs = []
    for ctx, tok in _steps(w, y):
        logp = logp + lp[ctx, tok]
        a = torch.tensor(ALPHAS, dtype=F64)
        costs.append(a.sum() * lp[ctx, tok] - (a * w.teacher_lp[:, ctx, tok]).sum())
    return logp, costs


def exact_J(w: World, theta: torch.Tensor, lam: float) -> torch.Tensor:
    """J(θ) of eq. 3/5 by enumeration: E[Σ_t c_t − Σ_n λ_n r_n]."""
    lam_t = torch.tensor(lambdas(lam), dtype=F64)
    total = theta.new_zeros(())
    for i, y in enumerate(w.responses):
        logp, costs = _seq_terms(w, theta, y)
        total = total + logp.exp() * (sum(costs) - w.rewards[i] @ lam_t)
    return total


def cost_to_go(w: World, theta: torch.Tensor, lam: float, gamma: float, t: int) -> torch.Tensor:
    """J_γ^{(t)}(θ) = E[Σ_{k≥t} γ^{k−t} c_k − Σ_n λ_n r_n] (steps counted from 0)."""
    lam_t = torch.tensor(lambdas(lam), dtype=F64)
    total = theta.new_zeros(())
    for i, y in enumerate(w.responses):
        logp, costs = _seq_terms(w, theta, y)
        disc = sum((gamma ** (k - t) * c for k, c in enumerate(costs) if k >= t), theta.new_zeros(()))
        total = total + logp.exp() * (disc - w.rewards[i] @ lam_t)
    return total


def stepwise_gradient(w: World, lam: float, gamma: float) -> torch.Tensor:
    """Σ_t ∂/∂θ_t J_γ^{(t)}: the step-t rows of θ are the step-t copy of the parameters."""
    out = torch.zeros_like(w.theta)
    step_of = torch.tensor([len(c) for c in w.contexts])
    for t in range(T):
        theta = w.theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(cost_to_go(w, theta, lam, gamma, t), theta)
        out[step_of == t] = g[step_of == t]
    return out


def frozen_context_gradient(w: World, lam: float) -> torch.Tensor:
    """∇_θ [Σ_t E_{ctx~d_t(θ0)} Σ_m α_m KL(π_θ(·|ctx)‖π_m) − Σ_n λ_n E_θ r_n] at θ0 (γ = 0)."""
    reach = torch.zeros(len(w.contexts), dtype=F64)
    lp0 = w.theta.log_softmax(-1)
    for c, idx in w.ctx_index.items():
        reach[idx] = sum(
            (lp0[w.ctx_index[c[:t]], c[t]] for t in range(len(c))), torch.zeros((), dtype=F64)
        ).exp()
    theta = w.theta.clone().requires_grad_(True)
    lp = theta.log_softmax(-1)
    kl = (lp.exp()[None] * (lp[None] - w.teacher_lp)).sum(-1)  # (M, C)
    dense = (torch.tensor(ALPHAS, dtype=F64) @ kl * reach).sum()
    lam_t = torch.tensor(lambdas(lam), dtype=F64)
    reward = sum(
        (_seq_terms(w, theta, y)[0].exp() * (w.rewards[i] @ lam_t) for i, y in enumerate(w.responses)),
        torch.zeros((), dtype=F64),
    )
    (g,) = torch.autograd.grad(dense - reward, theta)
    return g


# ------------------------------------------------------------- the learner's estimator


def make_batch(
    w: World,
    theta32: torch.Tensor,
    ys: Sequence[tuple[int, ...]],
    rewards: torch.Tensor,
    groups: Sequence[int],
) -> ObjectiveBatch:
    b = len(ys)
    ctx = torch.zeros(b, T, dtype=torch.long)
    tokens = torch.zeros(b, T, dtype=torch.long)
    mask = torch.zeros(b, T, dtype=torch.bool)
    for i, y in enumerate(ys):
        for t, (c, tok) in enumerate(_steps(w, y)):
            ctx[i, t], tokens[i, t], mask[i, t] = c, tok, True
    teacher = w.teacher_lp[:, ctx].float()  # (M, B, T, V)
    return ObjectiveBatch(
        logits=theta32[ctx],
        tokens=tokens,
        mask=mask,
        teacher_token_logprobs=teacher.gather(-1, tokens[None, ..., None].expand(len(ALPHAS), b, T, 1))[
            ..., 0
        ],
        teacher_logprobs=teacher,
        support_ids=None,
        rewards=rewards.float(),
        group_ids=torch.tensor(list(groups)),
    )


def config(gamma: float, baseline: str = "none") -> ObjectiveConfig:
    return ObjectiveConfig(
        gamma=gamma,
        baseline=baseline,  # type: ignore[arg-type]
        teacher_weights=ALPHAS,
        reward_names=("r0", "r1"),
    )


def learner_gradient(
    w: World,
    cfg: ObjectiveConfig,
    lam: float,
    ys: Sequence[tuple[int, ...]],
    rewards: torch.Tensor,
    groups: Sequence[int],
) -> torch.Tensor:
    theta32 = w.theta.float().requires_grad_(True)
    out = objective_loss(cfg, make_batch(w, theta32, ys, rewards, groups), lambdas(lam))
    (g,) = torch.autograd.grad(out.loss, theta32)
    return g.to(F64)


def expected_estimator(w: World, gamma: float, lam: float) -> torch.Tensor:
    """E_y[g_γ(y)] = Σ_y π(y) g_γ(y), g from the learner's loss on the single response y."""
    probs = torch.stack([_seq_terms(w, w.theta, y)[0].exp() for y in w.responses])
    cfg = config(gamma)
    total = torch.zeros_like(w.theta)
    for i, y in enumerate(w.responses):
        total += probs[i] * learner_gradient(w, cfg, lam, [y], w.rewards[i : i + 1], [0])
    return total


# ------------------------------------------------------------------------------- tests

ATOL = 2e-5


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


def test_world_is_a_distribution(world: World) -> None:
    probs = [float(_seq_terms(world, world.theta, y)[0].exp()) for y in world.responses]
    assert len(world.responses) == 15
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gamma_one_estimator_is_exact_gradient_of_eq3(world: World, lam: float) -> None:
    theta = world.theta.clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad(exact_J(world, theta, lam), theta)
    torch.testing.assert_close(expected_estimator(world, 1.0, lam), grad_j, atol=ATOL, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_estimator_is_stepwise_gradient_of_discounted_cost_to_go(
    world: World, gamma: float, lam: float
) -> None:
    expected = expected_estimator(world, gamma, lam)
    torch.testing.assert_close(expected, stepwise_gradient(world, lam, gamma), atol=ATOL, rtol=0)
    theta = world.theta.clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad(exact_J(world, theta, lam), theta)
    if gamma < 1.0:  # discounting biases the estimator away from ∇J of eq. 3 ...
        assert float((expected - grad_j).abs().max()) > 1e-2
        # ... and it is not the gradient of the textbook discounted objective
        # E[Σ_k γ^k c_k] − λ E[r] = J_γ^{(0)} either (the state weighting differs).
        theta = world.theta.clone().requires_grad_(True)
        (grad_disc,) = torch.autograd.grad(cost_to_go(world, theta, lam, gamma, 0), theta)
        assert float((expected - grad_disc).abs().max()) > 1e-2


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gamma_zero_is_frozen_context_kl_plus_reward_gradient(world: World, lam: float) -> None:
    torch.testing.assert_close(
        expected_estimator(world, 0.0, lam), frozen_context_gradient(world, lam), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_leave_one_out_baseline_is_unbiased_by_enumeration(world: World, gamma: float) -> None:
    """K = 2 responses per prompt; E over all 225 pairs of the per-response-averaged gradient."""
    lam = 1.0
    probs = torch.stack([_seq_terms(world, world.theta, y)[0].exp() for y in world.responses])
    cfg = config(gamma, "leave_one_out")
    total = torch.zeros_like(world.theta)
    n = len(world.responses)
    for i, j in itertools.product(range(n), range(n)):
        ys = [world.responses[i], world.responses[j]]
        rewards = torch.stack([world.rewards[i], world.rewards[j]])
        total += probs[i] * probs[j] * learner_gradient(world, cfg, lam, ys, rewards, [0, 0])
    torch.testing.assert_close(total, expected_estimator(world, gamma, lam), atol=ATOL, rtol=0)


def _sample(w: World, n: int, gen: torch.Generator) -> list[tuple[int, ...]]:
    probs = w.theta.softmax(-1)
    out = []
    for _ in range(n):
        y: tuple[int, ...] = ()
        while len(y) < T and (not y or y[-1] != EOS):
            y = (*y, int(torch.multinomial(probs[w.ctx_index[y]], 1, generator=gen)))
        out.append(y)
    return out


@pytest.mark.parametrize(
    ("gamma", "baseline"), [(0.0, "none"), (0.5, "none"), (1.0, "none"), (1.0, "leave_one_out")]
)
def test_monte_carlo_loss_converges_to_exact_expectation(world: World, gamma: float, baseline: str) -> None:
    lam, n_sub, per_sub, k = 1.0, 24, 500, 4
    gen = torch.Generator().manual_seed(1234)
    ys = _sample(world, n_sub * per_sub, gen)
    reward_of = {y: world.rewards[i] for i, y in enumerate(world.responses)}
    cfg = config(gamma, baseline)
    grads = []
    for s in range(n_sub):
        chunk = ys[s * per_sub : (s + 1) * per_sub]
        rewards = torch.stack([reward_of[y] for y in chunk])
        groups = [i // k for i in range(per_sub)]  # prompts of K = 4 responses (one x here)
        grads.append(learner_gradient(world, cfg, lam, chunk, rewards, groups))
    stack = torch.stack(grads)
    mc, se = stack.mean(0), stack.std(0) / n_sub**0.5
    exact = expected_estimator(world, gamma, lam)
    assert bool(((mc - exact).abs() <= 5 * se + 1e-3).all()), (mc - exact).abs().max()
    assert float((mc - exact).norm() / exact.norm()) < 0.10
