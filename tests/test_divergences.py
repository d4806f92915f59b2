"""Dense-term divergences (learner/divergences.py) against seed 002's worked numbers and a float64
autograd reference written here from the definitions."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

import kernels
from learner import divergences
from learner.divergences import (
    DivergenceError,
    check_divergence_params,
    divergence_names,
    get_divergence,
    register_divergence,
    target_logprobs,
)

F64 = torch.float64


def _ref(name: str, lp: torch.Tensor, lq: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Float64 definitions on (…, S) log-probs: the restricted sums, no renormalization."""
    p, q = lp.exp(), lq.exp()
    if name == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    if name == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (q * (q / m).log()).sum(-1) + (1 - beta) * (p * (p / m).log()).sum(-1)


def _probs_as_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float32).log()


W1 = torch.ones(1)


# ---------------------------------------------------------------- seed 002 worked numbers


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [("forward_kl", {}, 0.0239), ("reverse_kl", {}, 0.0231), ("jsd", {"beta": 0.5}, 0.0059)],
)
def test_seed_002_chapter_3_worked_example(name: str, params: dict[str, float], expected: float) -> None:
    teacher, student = [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]
    out = get_divergence(name)(
        _probs_as_logits(student),
        _probs_as_logits(teacher)[None],
        weights=W1,
        **params,
    )
    assert round(float(out.div[0]), 4) == expected


def test_seed_002_chapter_1_kl_is_forward_kl_teacher_to_student() -> None:
    teacher, student = [0.7, 0.2, 0.1], [0.3, 0.4, 0.3]
    out = get_divergence("forward_kl")(_probs_as_logits(student), _probs_as_logits(teacher)[None], weights=W1)
    # The seed prints 0.3447 (its rounded terms); the exact value is 0.34462.
    assert float(out.div[0]) == pytest.approx(0.3447, abs=1e-4)
    assert float(out.div[0]) == pytest.approx(
        0.7 * math.log(0.7 / 0.3) + 0.2 * math.log(0.2 / 0.4) + 0.1 * math.log(0.1 / 0.3), abs=1e-6
    )


def test_jsd_half_is_symmetric_and_bounded() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    jsd = get_divergence("jsd")
    ab = jsd(a, lb[None], weights=W1, beta=0.5).div
    ba = jsd(b, la[None], weights=W1, beta=0.5).div
    torch.testing.assert_close(ab, ba)
    assert bool((ab >= 0).all()) and bool((ab <= math.log(2)).all())


def test_jsd_beta_limits_are_forward_and_reverse_kl() -> None:
    """GKD: JSD_β/β → KL(P‖Q) as β → 0 and JSD_β/(1−β) → KL(Q‖P) as β → 1 (P = teacher)."""
    gen = torch.Generator().manual_seed(1)
    z, zt = torch.randn(4, 6, generator=gen, dtype=F64), torch.randn(4, 6, generator=gen, dtype=F64)
    lq = zt.log_softmax(-1)[None]
    jsd, eps = get_divergence("jsd"), 1e-5
    fkl = get_divergence("forward_kl")(z, lq, weights=W1).div
    rkl = _ref("reverse_kl", z.log_softmax(-1), lq[0])
    torch.testing.assert_close(jsd(z, lq, weights=W1, beta=eps).div / eps, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(jsd(z, lq, weights=W1, beta=1 - eps).div / eps, rkl, rtol=1e-3, atol=0)


# ---------------------------------------------------------- values and gradients vs reference


@dataclass(frozen=True)
class Case:
    logits: torch.Tensor  # (N, V)
    lq: torch.Tensor  # (M, N, V) or (M, N, K)
    ids: torch.Tensor | None  # (N, K)
    targets: torch.Tensor  # (N,)


def _case(support: bool, m: int, seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    n, v, k = 6, 11, 4
    logits = torch.randn(n, v, generator=gen, dtype=torch.float32) * 2
    lq_full = (torch.randn(m, n, v, generator=gen) * 2).log_softmax(-1)
    ids = None
    lq = lq_full
    if support:
        ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
        ids[0, 2:] = -1  # padding
        ids[1, :] = -1  # an all-padding row
        lq = lq_full.gather(-1, ids.clamp(min=0)[None].expand(m, n, k))
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[3] = -1
    return Case(logits, lq, ids, targets)


def _ref_rows(name: str, case: Case, weights: torch.Tensor, beta: float) -> torch.Tensor:
    z = case.logits.to(F64)
    lp = z.log_softmax(-1)
    ids, lq = case.ids, case.lq.to(F64)
    total = torch.zeros(z.shape[0], dtype=F64)
    for mi in range(lq.shape[0]):
        if ids is None:
            d = _ref(name, lp, lq[mi], beta)
        else:
            valid = ids >= 0
            lps = lp.gather(-1, ids.clamp(min=0))
            per = _ref(name, lps[..., None], lq[mi][..., None], beta)  # elementwise terms
            d = torch.where(valid, per, torch.zeros_like(per)).sum(-1)
        total = total + weights[mi].to(F64) * d
    return total


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
@pytest.mark.parametrize("support", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_value_and_gradient_match_float64_reference(name: str, support: bool, m: int) -> None:
    case = _case(support, m)
    weights = torch.tensor([0.5, 1.25, 0.0][:m]) if m > 1 else W1
    beta = 0.3
    params = {"beta": beta} if name == "jsd" else {}
    z = case.logits.clone().requires_grad_(True)
    out = get_divergence(name)(z, case.lq, weights=weights, ids=case.ids, targets=case.targets, **params)
    z64 = case.logits.to(F64).requires_grad_(True)
    ref = _ref_rows(name, replace(case, logits=z64), weights, beta)
    lp64 = z64.log_softmax(-1)
    tgt = case.targets
    ref_tlp = torch.where(tgt >= 0, lp64.gather(-1, tgt.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(out.div.to(F64), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.target_logprob.to(F64), ref_tlp, rtol=1e-5, atol=1e-6)
    gen = torch.Generator().manual_seed(7)
    g_div, g_tlp = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    (out.div * g_div + out.target_logprob * g_tlp).sum().backward()
    ((ref * g_div.to(F64)) + ref_tlp * g_tlp.to(F64)).sum().backward()
    assert z.grad is not None and z64.grad is not None
    torch.testing.assert_close(z.grad.to(F64), z64.grad, rtol=1e-4, atol=1e-6)
    if support:
        assert float(out.div.detach()[1]) == 0.0  # the all-padding row


def test_forward_kl_gradient_is_p_minus_q() -> None:
    case = _case(False, 1)
    z = case.logits.clone().requires_grad_(True)
    get_divergence("forward_kl")(z, case.lq, weights=W1).div.sum().backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad, z.detach().softmax(-1) - case.lq[0].exp())


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "jsd"])
def test_teacher_zero_probability_gives_finite_values_and_gradients(name: str) -> None:
    z = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    lq = torch.tensor([[[math.log(0.7), math.log(0.3), -math.inf]]])
    out = get_divergence(name)(z, lq, weights=W1)
    out.div.sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    if name != "reverse_kl":  # reverse KL of a teacher zero is +inf in exact arithmetic
        assert bool(torch.isfinite(out.div).all())


def test_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    case = _case(True, 2)
    w = torch.tensor([0.7, 0.3])
    results = []
    for chunk in (1000, 4):
        monkeypatch.setattr(divergences, "CHUNK_ROWS", chunk)
        z = case.logits.clone().requires_grad_(True)
        out = get_divergence("jsd")(z, case.lq, weights=w, ids=case.ids, targets=case.targets, beta=0.4)
        (out.div.sum() + out.target_logprob.sum()).backward()
        results.append((out.div.detach(), out.target_logprob.detach(), z.grad))
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b)


def test_reverse_kl_goes_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = kernels.hybrid_loss

    def spy(*args: object, **kwargs: object) -> kernels.HybridLoss:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "hybrid_loss", spy)
    case = _case(True, 2)
    w = torch.tensor([0.25, 0.75])
    out = get_divergence("reverse_kl")(case.logits, case.lq, weights=w, ids=case.ids, targets=case.targets)
    assert len(calls) == 1
    torch.testing.assert_close(out.div.to(F64), _ref_rows("reverse_kl", case, w, 0.5), rtol=1e-5, atol=1e-6)


def test_target_logprobs_without_teacher() -> None:
    z = torch.randn(5, 9)
    t = torch.tensor([0, 8, -1, 3, 3])
    got = target_logprobs(z, t)
    want = z.log_softmax(-1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
    torch.testing.assert_close(got, torch.where(t >= 0, want, 0.0))
    with pytest.raises(DivergenceError, match="targets"):
        target_logprobs(z, t[:3])


# ------------------------------------------------------------------ registry and errors


def test_registry_lists_valid_names_on_unknown() -> None:
    assert divergence_names() == ["forward_kl", "jsd", "kl_mix", "reverse_kl"]
    with pytest.raises(DivergenceError) as info:
        get_divergence("tvd")
    for name in ("forward_kl", "jsd", "reverse_kl"):
        assert name in str(info.value)
    with pytest.raises(DivergenceError, match="already registered"):
        register_divergence("jsd")(get_divergence("jsd"))


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("jsd", {"beta": 0.0}, "beta"),
        ("jsd", {"beta": 1.0}, "beta"),
        ("jsd", {"beta": math.nan}, "beta"),
        ("jsd", {"beta": 0.5, "temperature": 2.0}, "temperature"),
        ("forward_kl", {"beta": 0.5}, "beta"),
        ("reverse_kl", {"x": 1.0}, "divergence_params"),
        ("nope", {}, "valid divergences"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, float], field: str) -> None:
    with pytest.raises(DivergenceError, match=field):
        check_divergence_params(name, params)


def test_bad_shapes_name_the_field() -> None:
    case = _case(True, 1)
    assert case.ids is not None
    fkl = get_divergence("forward_kl")
    with pytest.raises(DivergenceError, match="teacher_logprobs"):
        fkl(case.logits, case.lq[:, :3], weights=W1, ids=case.ids)
    with pytest.raises(DivergenceError, match="ids"):
        fkl(case.logits, case.lq, weights=W1, ids=case.ids[:3])
    dup = case.ids.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(DivergenceError, match="distinct"):
        fkl(case.logits, case.lq, weights=W1, ids=dup)
    with pytest.raises(DivergenceError, match="weights"):
        fkl(case.logits, case.lq, weights=torch.ones(1, 1), ids=case.ids)
    with pytest.raises(DivergenceError, match="logits"):
        fkl(case.logits[0], case.lq, weights=W1, ids=case.ids)
