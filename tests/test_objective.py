"""The objective (learner/objective.py): returns, costs, the surrogate's gradient against an
independent float64 reference, table 5.5's special cases, Prop. 4, normalization, validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from learner.objective import (
    ObjectiveBatch,
    ObjectiveConfig,
    ObjectiveError,
    discounted_returns,
    objective_loss,
    token_costs,
)

F64 = torch.float64


# --------------------------------------------------------------------- discounted returns


def naive_returns(costs, mask, rewards, lambdas, gamma):
    """Eq. 12/15 literally: G_{t+1} = Σ_{k=t+1}^{T_b} γ^{k−t} c_k − Σ λ r (O(B·T²))."""
    b, t = costs.shape
    out = torch.zeros(b, t, dtype=F64)
    for i in range(b):
        length = int(mask[i].sum())
        for s in range(t):
            acc = sum(gamma ** (k - s) * float(costs[i, k]) for k in range(s + 1, length))
            out[i, s] = acc - float(rewards[i].double() @ lambdas.double())
    return out


def _returns_case(b: int, t: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    costs = torch.randn(b, t, generator=gen, dtype=F64)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None] < lengths[:, None]
    rewards = torch.rand(b, 2, generator=gen, dtype=F64)
    return costs, mask, rewards, torch.tensor([0.7, 1.5], dtype=F64)


@pytest.mark.parametrize("gamma", [0.0, 1e-12, 0.3, 0.9, 1.0])
@pytest.mark.parametrize(("t", "block"), [(11, 4), (13, 64), (64, 8), (1, 64)])
def test_discounted_returns_match_eq_12(gamma: float, t: int, block: int) -> None:
    costs, mask, rewards, lam = _returns_case(5, t)
    got = discounted_returns(costs, mask, rewards, lam, gamma, block=block)
    torch.testing.assert_close(got, naive_returns(costs, mask, rewards, lam, gamma))


def test_discounted_returns_rejects_bad_gamma_and_block() -> None:
    costs, mask, rewards, lam = _returns_case(2, 3)
    with pytest.raises(ObjectiveError, match="gamma"):
        discounted_returns(costs, mask, rewards, lam, 1.01)
    with pytest.raises(ObjectiveError, match="block"):
        discounted_returns(costs, mask, rewards, lam, 0.5, block=0)


def test_discounted_returns_exponent_is_k_minus_t() -> None:
    """Remark 2: c_{t+1} enters G_{t+1} with weight γ (not 1)."""
    costs = torch.tensor([[1.0, 10.0, 100.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = discounted_returns(costs, mask, torch.zeros(1, 0), torch.zeros(0), 0.5)
    torch.testing.assert_close(got, torch.tensor([[0.5 * 10 + 0.25 * 100, 0.5 * 100, 0.0]]))


def test_discounted_returns_gamma_zero_is_minus_lambda_r() -> None:
    costs, mask, rewards, lam = _returns_case(4, 9)
    got = discounted_returns(costs * 1e30, mask, rewards, lam, 0.0)
    torch.testing.assert_close(got, -(rewards @ lam)[:, None].expand(4, 9))


def test_discounted_returns_long_horizon_float32_against_float64_scan() -> None:
    """T = 4096 at γ close to 1 and small: finite, and equal to a float64 reverse scan."""
    gen = torch.Generator().manual_seed(3)
    b, t = 3, 4096
    costs = torch.randn(b, t, generator=gen)
    mask = torch.arange(t)[None] < torch.tensor([[t], [3000], [17]])
    for gamma in (0.999, 0.05):
        got = discounted_returns(costs, mask, torch.zeros(b, 0), torch.zeros(0), gamma)
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        c = torch.where(mask, costs, 0).double()
        h = torch.zeros(b, t + 1, dtype=F64)
        for s in range(t - 1, -1, -1):
            h[:, s] = c[:, s] + gamma * h[:, s + 1]
        want = gamma * h[:, 1:]
        # float32 rounding relative to the scale of the sums (|G| ~ 30 at γ = 0.999)
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------- costs


def test_token_costs_weighted_log_ratios_and_masked() -> None:
    s = torch.tensor([[-1.0, -2.0, float("nan")]])
    t = torch.tensor([[[-1.5, -1.0, float("inf")]], [[-0.5, -3.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    got = token_costs(s, t, torch.tensor([0.5, 2.0]), mask)
    want = torch.tensor([[0.5 * 0.5 + 2.0 * -0.5, 0.5 * -1.0 + 2.0 * 1.0, 0.0]])
    torch.testing.assert_close(got, want)
    assert bool((token_costs(s, t[:0], torch.zeros(0), mask) == 0).all())


# --------------------------------------------------------- a batch and a float64 reference


def make_batch(
    b: int = 6,
    t: int = 5,
    v: int = 7,
    m: int = 2,
    n: int = 2,
    k_support: int | None = None,
    seed: int = 0,
) -> ObjectiveBatch:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=gen)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[0] = t
    mask = torch.arange(t)[None] < lengths[:, None]
    full = torch.randn(m, b, t, v, generator=gen).log_softmax(-1)
    ids = None
    teacher = full
    if k_support is not None:
        ids = torch.stack([torch.randperm(v, generator=gen)[:k_support] for _ in range(b * t)])
        ids = ids.view(b, t, k_support)
        ids[0, 0, -1] = -1
        teacher = full.gather(-1, ids.clamp(min=0)[None].expand(m, b, t, k_support))
    tok_lp = full.gather(-1, tokens[None, ..., None].expand(m, b, t, 1))[..., 0]
    return ObjectiveBatch(
        logits=logits,
        tokens=tokens,
        mask=mask,
        teacher_token_logprobs=tok_lp,
        teacher_logprobs=teacher,
        support_ids=ids,
        rewards=torch.rand(b, n, generator=gen),
        group_ids=torch.arange(b) // 3,
    )


def reference_loss(cfg: ObjectiveConfig, batch: ObjectiveBatch, lam: list[float], z):
    """Independent float64 surrogate for the full-vocabulary reverse-KL case."""
    mask = batch.mask
    lp = z.log_softmax(-1)
    s = lp.gather(-1, batch.tokens[..., None])[..., 0]
    alphas = torch.tensor(cfg.teacher_weights, dtype=F64)
    tlp = batch.teacher_token_logprobs.double()
    costs = torch.where(mask, s.detach() * alphas.sum() - torch.einsum("m,mbt->bt", alphas, tlp), 0)
    lam_t = torch.tensor(lam, dtype=F64)
    g = naive_returns(costs, mask, batch.rewards.double(), lam_t, cfg.gamma)
    if cfg.baseline == "leave_one_out":
        base = torch.zeros_like(g)
        for i in range(g.shape[0]):
            others = [j for j in range(g.shape[0]) if j != i and batch.group_ids[j] == batch.group_ids[i]]
            if others:
                base[i] = g[others].mean(0)
        g = g - base
    dense = torch.zeros((), dtype=F64)
    if cfg.teacher_weights:
        assert batch.teacher_logprobs is not None
        lq = batch.teacher_logprobs.double()
        kl = (lp.exp()[None] * (lp[None] - lq)).sum(-1)  # (M, B, T)
        dense = torch.where(mask, torch.einsum("m,mbt->bt", alphas, kl), 0).sum()
    sparse = torch.where(mask, g.detach() * s, 0).sum()
    norm = 1 / z.shape[0] if cfg.normalization == "sum_over_k" else 1 / int(mask.sum())
    return (dense + sparse) * norm, dense * norm


def grads(cfg: ObjectiveConfig, batch: ObjectiveBatch, lam: list[float]):
    z = batch.logits.clone().requires_grad_(True)
    out = objective_loss(cfg, replace(batch, logits=z), lam)
    (g,) = torch.autograd.grad(out.loss, z)
    z64 = batch.logits.double().requires_grad_(True)
    ref, ref_dense = reference_loss(cfg, batch, lam, z64)
    (g64,) = torch.autograd.grad(ref, z64)
    return out, g, ref, ref_dense, g64


CFG = ObjectiveConfig(teacher_weights=(0.6, 0.4), reward_names=("a", "b"))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
@pytest.mark.parametrize("normalization", ["sum_over_k", "per_token_mean"])
def test_gradient_matches_float64_reference(gamma: float, baseline: str, normalization: str) -> None:
    cfg = replace(CFG, gamma=gamma, baseline=baseline, normalization=normalization)  # type: ignore[arg-type]
    batch = make_batch()
    out, g, ref, ref_dense, g64 = grads(cfg, batch, [0.5, 2.0])
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.dense.double(), ref_dense.detach(), rtol=1e-4, atol=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(out.dense + out.sparse), rel=1e-6)
    assert out.num_tokens == int(batch.mask.sum()) and out.num_responses == 6


def test_normalizations_differ_by_tokens_per_response() -> None:
    batch = make_batch()
    a = objective_loss(CFG, batch, [0.5, 2.0])
    b = objective_loss(replace(CFG, normalization="per_token_mean"), batch, [0.5, 2.0])
    ratio = int(batch.mask.sum()) / batch.mask.shape[0]
    assert float(a.loss) == pytest.approx(float(b.loss) * ratio, rel=1e-5)


# ------------------------------------------------------------------ table 5.5 of seed 000


def _dense_only_grad(batch: ObjectiveBatch, cfg: ObjectiveConfig) -> torch.Tensor:
    z64 = batch.logits.double().requires_grad_(True)
    _, dense = reference_loss(cfg, batch, [0.0] * len(cfg.reward_names), z64)
    (g,) = torch.autograd.grad(dense, z64)
    return g


def test_table_5_5_gamma0_lambda0_is_dense_only() -> None:
    cfg = replace(CFG, gamma=0.0)
    batch = make_batch()
    out, g, *_ = grads(cfg, batch, [0.0, 0.0])
    assert float(out.sparse) == 0.0
    torch.testing.assert_close(g.double(), _dense_only_grad(batch, cfg), rtol=1e-4, atol=1e-6)


def _score_grad(batch: ObjectiveBatch, weights: torch.Tensor) -> torch.Tensor:
    """∇_z Σ_{b,t on mask} weights[b,t] · log π(y_t) / B."""
    z64 = batch.logits.double().requires_grad_(True)
    s = z64.log_softmax(-1).gather(-1, batch.tokens[..., None])[..., 0]
    (g,) = torch.autograd.grad(torch.where(batch.mask, weights * s, 0).sum() / s.shape[0], z64)
    return g


def test_table_5_5_gamma0_lambda_positive_adds_the_reward() -> None:
    cfg = replace(CFG, gamma=0.0)
    batch = make_batch()
    lam = [0.5, 2.0]
    _, g, *_ = grads(cfg, batch, lam)
    reward = (batch.rewards.double() @ torch.tensor(lam, dtype=F64))[:, None].expand(-1, 5)
    want = _dense_only_grad(batch, cfg) + _score_grad(batch, -reward)
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)


def test_table_5_5_gamma1_is_full_trajectory_credit() -> None:
    cfg = replace(CFG, gamma=1.0)
    batch = make_batch()
    lam = [0.5, 2.0]
    _, g, *_ = grads(cfg, batch, lam)
    s = batch.logits.double().log_softmax(-1).gather(-1, batch.tokens[..., None])[..., 0]
    a = torch.tensor(cfg.teacher_weights, dtype=F64)
    c = torch.where(
        batch.mask, a.sum() * s - torch.einsum("m,mbt->bt", a, batch.teacher_token_logprobs.double()), 0
    )
    future = c.flip(-1).cumsum(-1).flip(-1) - c  # Σ_{k>t} c_k
    reward = (batch.rewards.double() @ torch.tensor(lam, dtype=F64))[:, None]
    want = _dense_only_grad(batch, cfg) + _score_grad(batch, future - reward)
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-6)


def test_table_5_5_no_teacher_is_pure_reinforce() -> None:
    cfg = ObjectiveConfig(teacher_weights=(), reward_names=("a", "b"), gamma=1.0)
    batch = replace(
        make_batch(m=0),
        teacher_logprobs=None,
        support_ids=None,
    )
    lam = [0.5, 2.0]
    z = batch.logits.clone().requires_grad_(True)
    out = objective_loss(cfg, replace(batch, logits=z), lam)
    (g,) = torch.autograd.grad(out.loss, z)
    assert float(out.dense) == 0.0 and float(out.kl_mean) == 0.0 and float(out.cost_mean) == 0.0
    reward = (batch.rewards.double() @ torch.tensor(lam, dtype=F64))[:, None].expand(-1, 5)
    torch.testing.assert_close(g.double(), _score_grad(batch, -reward), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ Prop. 4


def test_prop4_dense_term_equals_expected_score_times_cost() -> None:
    """E_{y_t~π}[∇ log π(y_t) c_t] (enumerated over the vocabulary) = ∇ of the dense term."""
    v = 6
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(v, generator=gen, dtype=F64)
    lq = torch.randn(2, v, generator=gen, dtype=F64).log_softmax(-1)
    alphas = (0.3, 1.2)
    lhs = torch.zeros(v, dtype=F64)
    for y in range(v):
        zz = z.clone().requires_grad_(True)
        lp = zz.log_softmax(-1)
        lpy = float(lp.detach()[y])
        c = sum(a * (lpy - float(lq[m, y])) for m, a in enumerate(alphas))
        (g,) = torch.autograd.grad(lp[y], zz)
        lhs += math.exp(lpy) * c * g
    batch = ObjectiveBatch(
        logits=z.float()[None, None].requires_grad_(True),
        tokens=torch.zeros(1, 1, dtype=torch.long),
        mask=torch.ones(1, 1, dtype=torch.bool),
        teacher_token_logprobs=lq[:, :1].float()[:, None],
        teacher_logprobs=lq.float()[:, None, None],
        support_ids=None,
        rewards=torch.zeros(1, 0),
        group_ids=torch.zeros(1, dtype=torch.long),
    )
    out = objective_loss(ObjectiveConfig(teacher_weights=alphas, gamma=0.0), batch, [])
    (rhs,) = torch.autograd.grad(out.loss, batch.logits)
    # γ = 0, no reward: the loss is the dense term alone.
    torch.testing.assert_close(rhs[0, 0].double(), lhs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ other divergences, support


@pytest.mark.parametrize(("name", "params"), [("forward_kl", {}), ("jsd", {"beta": 0.5})])
def test_dense_divergence_option_changes_only_the_dense_term(name: str, params: dict) -> None:
    batch = make_batch()
    lam = [0.5, 2.0]
    rkl = objective_loss(CFG, batch, lam)
    other = objective_loss(replace(CFG, divergence=name, divergence_params=params), batch, lam)
    torch.testing.assert_close(other.sparse, rkl.sparse)
    assert float((other.dense - rkl.dense).abs()) > 1e-4
    assert float(other.dense) > 0


def test_support_path_and_padding_rows_are_harmless() -> None:
    batch = make_batch(k_support=3)
    lam = [0.5, 2.0]
    out = objective_loss(CFG, batch, lam)
    # Garbage at padding positions changes nothing.
    pad = ~batch.mask
    dirty = replace(
        batch,
        teacher_logprobs=torch.where(pad[None, ..., None], math.nan, batch.teacher_logprobs),  # type: ignore[arg-type]
        teacher_token_logprobs=torch.where(pad[None], math.inf, batch.teacher_token_logprobs),
        tokens=torch.where(pad, -5, batch.tokens),
        support_ids=torch.where(pad[..., None], 10**6, batch.support_ids),  # type: ignore[arg-type]
    )
    out2 = objective_loss(CFG, dirty, lam)
    torch.testing.assert_close(out2.loss, out.loss)
    full = make_batch()
    dirty_full = replace(
        full,
        teacher_logprobs=torch.where(pad[None, ..., None], math.nan, full.teacher_logprobs),  # type: ignore[arg-type]
    )
    z = full.logits.clone().requires_grad_(True)
    loss = objective_loss(CFG, replace(dirty_full, logits=z), lam).loss
    (g,) = torch.autograd.grad(loss, z)
    assert bool(torch.isfinite(g).all()) and bool((g[pad] == 0).all())


def test_outputs_are_logged_parts() -> None:
    out = objective_loss(CFG, make_batch(), [0.5, 2.0])
    for part in (out.dense, out.sparse, out.kl_mean, out.cost_mean, out.return_mean, out.advantage_std):
        assert part.dim() == 0 and not part.requires_grad and bool(torch.isfinite(part))
    assert out.loss.requires_grad is False  # logits in make_batch carry no grad
    assert float(out.kl_mean) > 0


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"divergence": "tvd"}, "valid divergences"),
        ({"divergence": "jsd", "divergence_params": {"beta": 2.0}}, "beta"),
        ({"baseline": "mean"}, "baseline"),
        ({"normalization": "mean"}, "normalization"),
        ({"teacher_weights": (1.0, -0.5)}, r"teacher_weights\[1\]"),
        ({"teacher_weights": (math.inf,)}, r"teacher_weights\[0\]"),
        ({"reward_names": ("a", "a")}, "reward_names"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ObjectiveError, match=field):
        ObjectiveConfig(**kwargs)


def _bad_batches() -> list[tuple[dict, list[float], str]]:
    b = make_batch()
    holes = b.mask.clone()
    holes[0, 1] = False
    return [
        ({"mask": holes}, [0.5, 2.0], "mask"),
        ({"mask": b.mask.long()}, [0.5, 2.0], "mask"),
        ({"tokens": torch.where(b.mask, 7, b.tokens)}, [0.5, 2.0], "tokens"),
        ({"teacher_token_logprobs": b.teacher_token_logprobs[:1]}, [0.5, 2.0], "teacher_token_logprobs"),
        (
            {"teacher_token_logprobs": b.teacher_token_logprobs * math.nan},
            [0.5, 2.0],
            "teacher_token_logprobs",
        ),
        ({"teacher_logprobs": None}, [0.5, 2.0], "teacher_logprobs"),
        ({"teacher_logprobs": b.teacher_logprobs[..., :3]}, [0.5, 2.0], "teacher_logprobs"),  # type: ignore[index]
        ({"rewards": b.rewards[:, :1]}, [0.5, 2.0], "rewards"),
        ({"rewards": b.rewards * math.inf}, [0.5, 2.0], "rewards"),
        ({"group_ids": b.group_ids.float()}, [0.5, 2.0], "group_ids"),
        ({}, [0.5], "lambdas"),
        ({}, [0.5, -1.0], "lambdas"),
        ({}, [0.5, math.nan], "lambdas"),
        ({"logits": b.logits[:0]}, [0.5, 2.0], "empty"),
        ({"support_ids": torch.zeros(6, 5, 2)}, [0.5, 2.0], "support_ids"),
        ({"support_ids": torch.full((6, 5, 2), 7)}, [0.5, 2.0], "support_ids"),
    ]


@pytest.mark.parametrize(("change", "lam", "field"), _bad_batches())
def test_bad_batch_names_the_field(change: dict, lam: list[float], field: str) -> None:
    batch = make_batch()
    before = batch.logits.clone()
    with pytest.raises(ObjectiveError, match=field):
        objective_loss(CFG, replace(batch, **change), lam)
    assert torch.equal(batch.logits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k_support", [None, 3])
def test_cuda_matches_cpu(k_support: int | None) -> None:
    """The same batch on CUDA (Triton reverse-KL kernel) and on CPU (fused torch path)."""
    batch = make_batch(k_support=k_support)
    cfg = replace(CFG, baseline="leave_one_out", gamma=0.7)
    results = []
    for device in ("cpu", "cuda"):
        moved = ObjectiveBatch(
            **{f: (x.to(device) if isinstance(x, torch.Tensor) else x) for f, x in vars(batch).items()}
        )
        z = moved.logits.clone().requires_grad_(True)
        out = objective_loss(cfg, replace(moved, logits=z), torch.tensor([0.5, 2.0]))
        (g,) = torch.autograd.grad(out.loss, z)
        results.append((out.loss.detach().cpu(), g.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
