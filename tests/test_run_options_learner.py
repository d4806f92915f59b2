"""Learner-side run options of issue 9: KL mixing (seed 003), token importance (seed 002 ch. 7),
SelecTKD (seed 001) and the teacher top-p support (seed 004, Definition 1), each against a float64
formula written here, plus validation, the default spec's unchanged loss, and the per-step metrics
of ``Learner.train_step`` (real redis-server, tiny real student)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from contracts.redis_server import make_client
from contracts.rollout_record import DecodedRollout, Reward, TeacherArrays
from contracts.runspec import ObjectiveSpec, RunSpec
from contracts.runstate import METRIC_FIELDS
from learner import token_weights
from learner.batching import (
    mean_support_size,
    objective_batch,
    pack_sequences,
    rewards_matrix,
    support,
    teacher_nucleus,
)
from learner.divergences import DivergenceError, check_divergence_params, get_divergence
from learner.objective import (
    ObjectiveBatch,
    ObjectiveConfig,
    ObjectiveError,
    discounted_returns,
    objective_loss,
    token_costs,
)
from learner.train import Learner, LearnerConfig, objective_config
from proto.distill.v1 import reward_pb2
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.redis_fixtures import embedded
from tests.test_objective import make_batch

F64 = torch.float64
W1 = torch.ones(1)


def _lq(m: int, n: int, v: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, v, generator=gen) * 2).log_softmax(-1)


def _support_case(n: int = 6, v: int = 11, k: int = 4, m: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen) * 2
    full = _lq(m, n, v, seed + 1)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    ids[0, 2:] = -1
    return logits, full, ids, full.gather(-1, ids.clamp(min=0)[None].expand(m, n, k))


def _restricted(lp: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if ids is None:
        return lp, None
    return lp.gather(-1, ids.clamp(min=0)), ids >= 0


def _fkl(lp: torch.Tensor, lq: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    term = lq.exp() * (lq - lp)
    return (term if valid is None else torch.where(valid, term, 0.0)).sum(-1)


def _rkl(lp: torch.Tensor, lq: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    term = lp.exp() * (lp - lq)
    return (term if valid is None else torch.where(valid, term, 0.0)).sum(-1)


# ------------------------------------------------------------------------ KL mixing, seed 003


@pytest.mark.parametrize("use_support", [False, True])
def test_kl_mix_end_points_are_reverse_and_forward_kl_bit_for_bit(use_support: bool) -> None:
    logits, full, ids, at_ids = _support_case(m=1)
    lq, sup = (at_ids, ids) if use_support else (full, None)
    targets = torch.arange(6) % 11
    for w, name in ((0.0, "reverse_kl"), (1.0, "forward_kl")):
        z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        mix = get_divergence("kl_mix")(z1, lq, weights=W1, ids=sup, targets=targets, forward_weight=w)
        ref = get_divergence(name)(z2, lq, weights=W1, ids=sup, targets=targets)
        (mix.div.sum() + mix.target_logprob.sum()).backward()
        (ref.div.sum() + ref.target_logprob.sum()).backward()
        assert torch.equal(mix.div, ref.div) and torch.equal(mix.target_logprob, ref.target_logprob)
        assert z1.grad is not None and z2.grad is not None and torch.equal(z1.grad, z2.grad)


@pytest.mark.parametrize("use_support", [False, True])
def test_kl_mix_value_and_gradient_match_the_float64_formula(use_support: bool) -> None:
    logits, full, ids, at_ids = _support_case(m=2)
    lq, sup = (at_ids, ids) if use_support else (full, None)
    alphas, w = torch.tensor([0.7, 0.4]), 0.3
    targets = torch.tensor([1, 2, -1, 4, 5, 0])
    z = logits.clone().requires_grad_(True)
    out = get_divergence("kl_mix")(z, lq, weights=alphas, ids=sup, targets=targets, forward_weight=w)
    z64 = logits.to(F64).requires_grad_(True)
    lp_full = z64.log_softmax(-1)
    lp, valid = _restricted(lp_full, sup)
    lq64 = lq.to(F64)
    ref = sum(
        a * (w * _fkl(lp, lq64[m], valid) + (1 - w) * _rkl(lp, lq64[m], valid)) for m, a in enumerate(alphas)
    )
    ref_tlp = torch.where(targets >= 0, lp_full.gather(-1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(out.div.to(F64), ref, rtol=1e-5, atol=1e-6)
    # the sparse term's log-prob is counted once, not once per KL direction
    torch.testing.assert_close(out.target_logprob.to(F64), ref_tlp, rtol=1e-5, atol=1e-6)
    assert set(out.parts) == {"forward_kl", "reverse_kl"}
    torch.testing.assert_close(
        w * out.parts["forward_kl"] + (1 - w) * out.parts["reverse_kl"], out.div.detach()
    )
    g = torch.linspace(-1, 1, 6)
    (out.div * g + out.target_logprob).sum().backward()
    assert z.grad is not None
    if not use_support:  # full vocabulary: the exact gradient of the formula
        (ref * g.to(F64) + ref_tlp).sum().backward()
        assert z64.grad is not None
        torch.testing.assert_close(z.grad.to(F64), z64.grad, rtol=1e-4, atol=1e-6)
        return
    # On a support the reverse part's gradient is the kernel's B.2 rule (zero outside S), the
    # forward part's the exact one of the restricted sum: w and 1 − w times each divergence's own.
    grads = []
    for name in ("forward_kl", "reverse_kl"):
        zi = logits.clone().requires_grad_(True)
        d = get_divergence(name)(zi, lq, weights=alphas, ids=sup, targets=targets)
        (d.div * g + d.target_logprob).sum().backward()
        assert zi.grad is not None
        grads.append(zi.grad)
    # w + (1 − w) = 1: the target log-prob's gradient appears exactly once, as in kl_mix
    torch.testing.assert_close(z.grad, w * grads[0] + (1 - w) * grads[1], rtol=1e-4, atol=1e-6)


def test_kl_mix_in_the_objective_reports_both_parts() -> None:
    batch = make_batch(m=1, k_support=4)
    cfg = ObjectiveConfig(teacher_weights=(1.0,), reward_names=("a", "b"), divergence="kl_mix",
                          divergence_params={"forward_weight": 0.25})  # fmt: skip
    out = objective_loss(cfg, batch, [0.0, 0.0])
    f, r = out.extras["kl_mix_forward_kl"], out.extras["kl_mix_reverse_kl"]
    assert float(out.kl_mean) == pytest.approx(0.25 * float(f) + 0.75 * float(r), rel=1e-5)


# --------------------------------------------------------------- token importance, seed 002 ch. 7


def _importance_ref(logits: torch.Tensor, lq: torch.Tensor, ids: torch.Tensor | None, alphas: torch.Tensor):
    """w_t = Σ_m α_m (1 − H(q_m)/log V)·KL(q_m‖p) / Σ α, renormalized over the support when given."""
    v = logits.shape[-1]
    lp = logits.to(F64).log_softmax(-1)
    out = torch.zeros(logits.shape[0], dtype=F64)
    for m, a in enumerate(alphas.to(F64)):
        for n in range(logits.shape[0]):
            q_lp, p_lp = lq[m, n].to(F64), lp[n]
            if ids is not None:
                keep = ids[n] >= 0
                q_lp = q_lp[keep] - q_lp[keep].logsumexp(0)
                p_sel = p_lp[ids[n][keep]]
                p_lp = p_sel - p_sel.logsumexp(0)
            q = q_lp.exp()
            h = -(q * q_lp).sum()
            kl = (q * (q_lp - p_lp)).sum()
            out[n] += a * (1 - h / math.log(v)) * kl
    return out / alphas.sum()


@pytest.mark.parametrize("use_support", [False, True])
def test_importance_scores_match_the_seed_formula(use_support: bool) -> None:
    logits, full, ids, at_ids = _support_case(m=2)
    lq, sup = (at_ids, ids) if use_support else (full, None)
    alphas = torch.tensor([0.7, 0.4])
    got = token_weights.importance_scores(logits, lq, sup, alphas)
    torch.testing.assert_close(got.to(F64), _importance_ref(logits, lq, sup, alphas), rtol=1e-5, atol=1e-6)
    assert bool((got >= 0).all()), "a KL of renormalized distributions is never negative"


def test_importance_is_zero_where_the_teacher_is_uniform_or_the_student_agrees() -> None:
    v = 8
    uniform = torch.full((1, 1, v), -math.log(v))  # H = log V: confidence 0
    agree = torch.randn(1, v)
    teacher = torch.cat([uniform, agree.log_softmax(-1)[None]], 1)
    got = token_weights.importance_scores(torch.cat([torch.randn(1, v), agree]), teacher, None, W1)
    torch.testing.assert_close(got, torch.zeros(2), atol=1e-6, rtol=0)


def _dense_rows(cfg: ObjectiveConfig, batch: ObjectiveBatch, z: torch.Tensor) -> torch.Tensor:
    """(B, T) unweighted reverse-KL dense term on the batch, float64, from the definitions."""
    lp = z.log_softmax(-1)
    lq = batch.teacher_logprobs
    assert lq is not None
    total = torch.zeros(lp.shape[:2], dtype=F64)
    for m, a in enumerate(cfg.teacher_weights):
        total = total + a * (lp.exp() * (lp - lq[m].to(F64))).sum(-1)
    return total


@pytest.mark.parametrize("mode", ["weight", "threshold"])
def test_token_importance_weights_the_dense_term_as_a_stop_gradient(mode: str) -> None:
    batch = make_batch(m=1)
    base = ObjectiveConfig(teacher_weights=(1.0,), reward_names=("a", "b"))
    b, t, v = batch.logits.shape
    assert batch.teacher_logprobs is not None
    score = _importance_ref(
        batch.logits.reshape(b * t, v), batch.teacher_logprobs.reshape(1, b * t, v), None, W1
    )
    score = score.view(b, t)
    ranked = score[batch.mask].sort().values
    mid = len(ranked) // 2
    threshold = float(ranked[mid - 1] + ranked[mid]) / 2  # half the tokens kept, none on the edge
    cfg = replace(base, token_importance=mode, token_importance_threshold=threshold)  # type: ignore[arg-type]
    w = score if mode == "weight" else (score >= threshold).to(F64)
    z = batch.logits.clone().requires_grad_(True)
    out = objective_loss(cfg, replace(batch, logits=z), [0.0, 0.0])
    (g,) = torch.autograd.grad(out.loss, z)
    z64 = batch.logits.to(F64).requires_grad_(True)
    ref_dense = torch.where(batch.mask, w * _dense_rows(cfg, batch, z64), 0.0).sum() / b
    (g64,) = torch.autograd.grad(ref_dense, z64)  # w held constant: the weight is a stop-gradient
    torch.testing.assert_close(out.dense.to(F64), ref_dense.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.to(F64), g64, rtol=1e-4, atol=1e-6)
    on = batch.mask
    assert float(out.extras["token_importance_mean"]) == pytest.approx(float(score[on].mean()), rel=1e-5)
    kept = (score >= threshold) if mode == "threshold" else (score > 0)
    assert 0 < float(kept[on].double().mean()) < 1 or mode == "weight"
    assert float(out.extras["token_importance_kept"]) == pytest.approx(float(kept[on].double().mean()))


# ------------------------------------------------------------------------------ SelecTKD, seed 001


def _greedy_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Four positions, V = 5, student argmax = id 0 everywhere; the teacher ranks id 0 1st, 2nd
    (tied with the 3rd), 3rd and last."""
    logits = torch.tensor([[3.0, 0, 0, 0, 0]]).repeat(4, 1)
    probs = torch.tensor([
        [0.5, 0.2, 0.1, 0.1, 0.1],   # rank 1
        [0.3, 0.3, 0.3, 0.05, 0.05],  # tied 1st..3rd: within top-2 (ties at the k-th count in)
        [0.2, 0.4, 0.3, 0.05, 0.05],  # rank 3
        [0.01, 0.4, 0.3, 0.19, 0.1],  # rank 5
    ])  # fmt: skip
    return logits, probs.log()[None]


def test_greedy_top_k_student_argmax_within_the_teachers_top_k() -> None:
    logits, lq = _greedy_case()
    assert token_weights.greedy_top_k_accept(logits, lq, 2).tolist() == [True, True, False, False]
    assert token_weights.greedy_top_k_accept(logits, lq, 3).tolist() == [True, True, True, False]
    assert token_weights.greedy_top_k_accept(logits, lq, 5).tolist() == [True] * 4
    # the same from the teacher's top-3 list, shuffled: id 0 is outside the list in row 3
    top_lp, top_ids = lq.topk(3, dim=-1)
    perm = torch.tensor([2, 0, 1])
    got = token_weights.greedy_top_k_accept(logits, lq, 2, top_ids[..., perm], top_lp[..., perm])
    assert got.tolist() == [True, True, False, False]
    # several teachers: accepted only where every teacher accepts
    two = torch.cat([lq, lq.flip(1)])
    assert token_weights.greedy_top_k_accept(logits, two, 3).tolist() == [False, True, True, False]


def test_spec_k_accepts_an_identical_teacher_and_rejects_a_disjoint_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 9)
    same = logits.log_softmax(-1)[None]
    assert bool(token_weights.spec_k_accept(logits, same, None, 1).all())
    peaked = torch.full((50, 9), -30.0)
    peaked[:, 0] = 30.0  # the student proposes id 0 ...
    disjoint = torch.full((1, 50, 9), -math.log(8))
    disjoint[..., 0] = -math.inf  # ... which the teacher never emits
    assert not bool(token_weights.spec_k_accept(peaked, disjoint, None, 5).any())
    # on a support that lacks the proposal the teacher probability is unknown: rejected
    ids = torch.arange(1, 5).repeat(50, 1)
    assert not bool(token_weights.spec_k_accept(peaked, peaked.log_softmax(-1)[None, :, 1:5], ids, 5).any())


@pytest.mark.parametrize("k", [1, 3])
def test_spec_k_acceptance_rate_is_one_minus_rejection_to_the_k(k: int) -> None:
    """One proposal passes with probability Σ_y q(y)·min(1, p(y)/q(y)) = Σ min(p, q)."""
    torch.manual_seed(1)
    n = 20000
    q = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=F64)
    p = torch.tensor([0.1, 0.3, 0.5, 0.1], dtype=F64)
    expected = 1 - (1 - float(torch.minimum(p, q).sum())) ** k
    got = token_weights.spec_k_accept(q.log().float().repeat(n, 1), p.log().float().repeat(1, n, 1), None, k)
    sd = math.sqrt(expected * (1 - expected) / n)
    assert float(got.double().mean()) == pytest.approx(expected, abs=5 * sd)


@pytest.mark.parametrize("mode", ["greedy_top_k", "spec_k"])
def test_selective_weights_rejected_tokens_by_beta(mode: str) -> None:
    batch = make_batch(m=1, v=7)
    cfg = replace(ObjectiveConfig(teacher_weights=(1.0,), reward_names=("a", "b")),
                  selective=mode, selective_k=2, selective_beta=0.1)  # type: ignore[arg-type]  # fmt: skip
    b, t, v = batch.logits.shape
    assert batch.teacher_logprobs is not None
    flat = batch.logits.reshape(b * t, v), batch.teacher_logprobs.reshape(1, b * t, v)
    torch.manual_seed(3)
    if mode == "greedy_top_k":
        accepted = token_weights.greedy_top_k_accept(*flat, 2)
    else:
        accepted = token_weights.spec_k_accept(flat[0], flat[1], None, 2)
    accepted = accepted.view(b, t)
    assert 0 < int(accepted[batch.mask].sum()) < int(batch.mask.sum())
    torch.manual_seed(3)  # spec_k draws the same proposals inside the objective
    out = objective_loss(cfg, batch, [0.0, 0.0])
    w = torch.where(accepted, 1.0, 0.1).to(F64)
    ref = torch.where(batch.mask, w * _dense_rows(cfg, batch, batch.logits.to(F64)), 0.0).sum() / b
    torch.testing.assert_close(out.dense.to(F64), ref, rtol=1e-5, atol=1e-6)
    assert float(out.extras["selectkd_accept_rate"]) == pytest.approx(
        float(accepted[batch.mask].double().mean())
    )


def test_greedy_top_k_on_a_support_needs_the_teachers_lists() -> None:
    batch = make_batch(m=1, k_support=4)
    cfg = ObjectiveConfig(
        teacher_weights=(1.0,), reward_names=("a", "b"), selective="greedy_top_k", selective_k=3
    )
    with pytest.raises(ObjectiveError, match="teacher_top_ids"):
        objective_loss(cfg, batch, [0.0, 0.0])
    top_lp, top_ids = torch.randn(1, 6, 5, 7).log_softmax(-1).topk(2, dim=-1)
    with pytest.raises(ObjectiveError, match="selective_k"):
        objective_loss(cfg, replace(batch, teacher_top_ids=top_ids, teacher_top_logprobs=top_lp), [0.0, 0.0])


# ------------------------------------------------------------ teacher top-p support, seed 004


@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [
        ([0.5, 0.3, 0.15, 0.05], 0.8, {10, 11}),  # 0.5 + 0.3 reaches 0.8 exactly
        ([0.5, 0.3, 0.15, 0.05], 0.81, {10, 11, 12}),
        ([0.5, 0.3, 0.15, 0.05], 0.5, {10}),
        ([0.5, 0.3, 0.15, 0.05], 1.0, {10, 11, 12, 13}),
        # ties of 0.2 at ids 11, 12, 13, listed as 12, 10, 13, 11: the first listed, 12, is taken
        ([0.4, 0.2, 0.2, 0.2], 0.6, {10, 12}),
        ([0.2, 0.1, 0.1, 0.1], 0.9, {10, 11, 12, 13}),  # K caps the nucleus: 0.5 < 0.9 keeps all K
    ],
)
def test_teacher_nucleus_is_the_smallest_set_reaching_p(
    probs: list[float], top_p: float, kept: set[int]
) -> None:
    perm = torch.tensor([2, 0, 3, 1])  # the list in any order: ids 12, 10, 13, 11
    lp = torch.tensor(probs).log()[perm]
    ids = torch.tensor([10, 11, 12, 13])[perm]
    out = teacher_nucleus(torch.stack([ids, torch.full_like(ids, -1)]), torch.stack([lp, lp]), top_p)
    assert {int(i) for i in out[0] if i >= 0} == kept
    assert bool((out[0][out[0] >= 0] == ids[out[0] >= 0]).all()), "kept ids stay in place"
    assert bool((out[1] == -1).all()), "padding stays padding"


def _rollout(tokens: list[int], start: int, v: int, k: int, seed: int, teachers: tuple[str, ...] = ("t0",),
             group: int = 0) -> DecodedRollout:  # fmt: skip
    """A record whose teacher arrays are those of a real distribution over ``v`` ids."""
    rng = np.random.default_rng(seed)
    p = len(tokens) - start
    student = np.stack([rng.permutation(v)[:k] for _ in range(p)])  # the student's top-K candidates
    arrays = []
    for name in teachers:
        logits = rng.normal(size=(p, v)) * 2
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
        arrays.append(TeacherArrays(
            teacher=name, token_logprobs=lp[np.arange(p), tokens[start:]].astype(np.float32),
            top_ids=top.astype(np.int32), top_logprobs=np.take_along_axis(lp, top, -1).astype(np.float32),
            candidate_logprobs=np.take_along_axis(lp, student, -1).astype(np.float32),
        ))  # fmt: skip
    return DecodedRollout(
        rollout_id=f"r{seed}", run_id="run-x", prompt_id=seed // 2, group_index=group, group_size=2,
        attempt=1, dataset_index=0, policy_version=0, token_ids=np.asarray(tokens, np.int32),
        response_start=start, sampled_logprobs=np.zeros(p, np.float32),
        student_top_ids=student.astype(np.int32), teachers=arrays,
        rewards=[Reward("acc", float(seed % 2), reward_pb2.REWARD_STATUS_OK)],
    )  # fmt: skip


def test_teacher_top_p_support_masks_the_top_k_beyond_the_nucleus() -> None:
    r = _rollout([1, 2, 3, 4, 5, 6], 2, v=12, k=5, seed=0)
    ids_k, lp_k = support([r], ["t0"], "teacher_top_k", 4, 12)
    ids_p, lp_p = support([r], ["t0"], "teacher_top_p", 4, 12, top_p=0.6)
    assert ids_k is not None and lp_k is not None and ids_p is not None and lp_p is not None
    assert torch.equal(lp_k, lp_p)
    probs = lp_k[0].double().exp()  # (1, T, K), sorted descending by construction
    above = probs.cumsum(-1) - probs
    assert torch.equal(ids_p >= 0, above < 0.6 - 1e-6)
    sizes = (ids_p >= 0).sum(-1)
    assert int(sizes.min()) >= 1 and int(sizes.max()) <= 5
    assert len(set(sizes.flatten().tolist())) > 1, "the nucleus size varies per position"
    ids_1, _ = support([r], ["t0"], "teacher_top_p", 4, 12, top_p=1.0)
    assert ids_1 is not None and torch.equal(ids_1, ids_k)
    packed = pack_sequences([r])
    batch = objective_batch(torch.randn(1, packed.width, 12), packed, [r], ["t0"], "teacher_top_p",
                            rewards_matrix([r], [], [])[0], top_p=0.6)  # fmt: skip
    assert mean_support_size(batch) == pytest.approx(float(sizes.double().mean()))


# --------------------------------------------------------------------- validation and defaults


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_mix_forward_weight", 1.5),
        ("kl_mix_forward_weight", float("nan")),
        ("token_importance", "always"),
        ("token_importance_threshold", -0.1),
        ("selective", "top_k"),
        ("selective_k", 0),
        ("selective_beta", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("support", "teacher_top_q"),
        ("divergence", "kl_max"),
    ],
)
def test_bad_option_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        ObjectiveSpec.model_validate({field: value})


def test_greedy_top_k_larger_than_the_teachers_list_is_refused() -> None:
    with pytest.raises(ValidationError, match="selective_k"):
        ObjectiveSpec(selective="greedy_top_k", selective_k=9, top_k=8, support="student_top_k")
    ObjectiveSpec(selective="greedy_top_k", selective_k=9, top_k=8, support="full")  # the whole vocabulary
    ObjectiveSpec(selective="spec_k", selective_k=9, top_k=8)  # k proposals, no list needed


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"token_importance": "x"}, "token_importance"),
        ({"token_importance_threshold": math.inf}, "token_importance_threshold"),
        ({"selective": "x"}, "selective"),
        ({"selective_k": 0}, "selective_k"),
        ({"selective_beta": -1.0}, "selective_beta"),
        ({"divergence": "kl_mix", "divergence_params": {"forward_weight": 2.0}}, "forward_weight"),
    ],
)
def test_bad_objective_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ObjectiveError, match=field):
        ObjectiveConfig(**kwargs)  # type: ignore[arg-type]


def test_kl_mix_params_are_checked() -> None:
    with pytest.raises(DivergenceError, match="forward_weight"):
        check_divergence_params("kl_mix", {"forward_weight": -0.5})
    with pytest.raises(DivergenceError, match="beta"):
        check_divergence_params("kl_mix", {"beta": 0.5})
    check_divergence_params("kl_mix", {"forward_weight": 0.0})


def _spec(student: str = "s", **objective: object) -> RunSpec:
    return RunSpec.model_validate({"student": student, "dataset": "d.jsonl", "teachers": [{"name": "t0"}],
                                   "rewards": [{"name": "acc", "verifier": "exact_match"}],
                                   "objective": objective})  # fmt: skip


def test_the_default_spec_computes_the_loss_exactly_as_before() -> None:
    """Options off: the same tensors as the pre-option objective, recomputed here step by step."""
    cfg = objective_config(_spec())
    assert (cfg.token_importance, cfg.selective, cfg.divergence_params) == ("off", "off", {})
    batch = make_batch(m=1, n=1, k_support=4)
    z = batch.logits.clone().requires_grad_(True)
    out = objective_loss(cfg, replace(batch, logits=z), [1.0])
    assert out.extras == {}
    (g,) = torch.autograd.grad(out.loss, z)
    b, t, v = batch.logits.shape
    z2 = batch.logits.clone().requires_grad_(True)
    assert batch.support_ids is not None and batch.teacher_logprobs is not None
    ids = torch.where(batch.mask[..., None], batch.support_ids, -1).reshape(b * t, -1)
    targets = torch.where(batch.mask, batch.tokens, -1).reshape(-1)
    d = get_divergence("reverse_kl")(z2.reshape(b * t, v), batch.teacher_logprobs.reshape(1, b * t, -1),
                                     weights=W1, ids=ids, targets=targets)  # fmt: skip
    div, tlp = d.div.view(b, t), d.target_logprob.view(b, t)
    costs = token_costs(tlp.detach(), batch.teacher_token_logprobs, W1, batch.mask)
    adv = torch.where(
        batch.mask, discounted_returns(costs, batch.mask, batch.rewards, torch.ones(1), 0.0), 0.0
    )
    loss = torch.where(batch.mask, div, 0.0).sum() * (1.0 / b) + (adv.detach() * tlp).sum() * (1.0 / b)
    (g2,) = torch.autograd.grad(loss, z2)
    assert torch.equal(out.loss.detach(), loss.detach()) and torch.equal(g, g2)


# ----------------------------------------------------------------- Learner.train_step metrics


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("student"), TinySpec(vocab_size=24, hidden_size=16, seed=2)
    )


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ({"divergence": "kl_mix", "kl_mix_forward_weight": 0.3, "support": "teacher_top_p", "top_p": 0.7,
          "top_k": 6, "token_importance": "threshold", "token_importance_threshold": 0.05,
          "selective": "greedy_top_k", "selective_k": 3},
         {"kl_mix_forward_kl", "kl_mix_reverse_kl", "token_importance_mean", "token_importance_kept",
          "selectkd_accept_rate", "support_size"}),
        ({"support": "full", "token_importance": "weight", "selective": "spec_k", "selective_k": 4},
         {"token_importance_mean", "token_importance_kept", "selectkd_accept_rate"}),
        ({}, set()),
    ],
)  # fmt: skip
def test_train_step_reports_the_options_metrics(
    tmp_path: Path, student_dir: Path, objective: dict[str, object], expected: set[str]
) -> None:
    spec = _spec(str(student_dir), **objective)
    v, k = 24, spec.objective.top_k
    rollouts = [
        _rollout([2, 5, 7, 9, 11, 4, 6][: 5 + i % 3], 2, v=v, k=k, seed=i, group=i % 2) for i in range(4)
    ]
    if spec.objective.support == "full":  # full support: the teacher scores every id as a candidate
        for r in rollouts:
            t = r.teachers[0]
            lp = np.full((r.num_positions, v), -50.0, np.float32)
            np.put_along_axis(lp, t.top_ids.astype(np.int64), t.top_logprobs, -1)
            t.candidate_logprobs = (lp - np.log(np.exp(lp).sum(-1, keepdims=True))).astype(np.float32)
    with embedded(tmp_path / "redis") as server:
        client = make_client(server.url)
        cfg = LearnerConfig(run_id="opts", run_dir=tmp_path / "run", consumer="learner")
        learner = Learner(cfg, client, spec)
        metrics = learner.train_step(rollouts, len(rollouts))
        client.close()
    base = ("loss", "dense_kl", "sparse", "tokens", "lr")
    new = {name for name in metrics if name in METRIC_FIELDS and name not in base}
    assert new == expected
    assert all(math.isfinite(metrics[name]) for name in expected) and math.isfinite(metrics["loss"])
    for name in expected & {"token_importance_kept", "selectkd_accept_rate"}:
        assert 0.0 <= metrics[name] <= 1.0
    if "support_size" in expected:
        assert 1.0 <= metrics["support_size"] <= k
