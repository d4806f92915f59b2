"""Rollout-side run options of issue 9: on_policy_fraction (GKD's λ, seed 002 ch. 4), flawed-prefix
rejection (seed 002 ch. 7) and the entropy-gated length curriculum (seed 003).

Decision functions on hand-built inputs; the worker's resampling and reference groups on a tiny
real model with a real Redis; the sparse term's on-policy mask against the gradient with the
reference rows removed; and one end-to-end run with all three options on.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer

from contracts import keys
from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from contracts.rollout_record import build_rollout, decode_rollout
from contracts.runspec import LengthCurriculumSpec, RunSpec, SamplingSpec, on_policy_share
from contracts.schedules import ConstantSchedule, LinearSchedule, PiecewiseSchedule
from learner import run_state
from learner.objective import ObjectiveConfig, objective_loss
from learner.train import entropy_sum
from services.rollout.dataset import DatasetError, Prompt, require_reference
from services.rollout.queue import PromptLease
from services.rollout.sampler import make_sampler
from services.rollout.sampling import (
    Sample,
    SamplingConfig,
    from_reference,
    perplexity,
    split_flawed,
    teacher_forced,
)
from services.rollout.worker import RolloutWorker, WorkerConfig, _Plan, _Run, _Student
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.redis_fixtures import embedded
from tests.test_objective import make_batch
from tests.training_stack import TrainingStack

# ------------------------------------------------------------------------------- the run spec


def test_defaults_leave_the_options_off() -> None:
    s = SamplingSpec()
    assert s.on_policy_fraction == ConstantSchedule(kind="constant", value=1.0)
    assert s.reference_field == "answer"
    assert s.max_perplexity is None and s.max_resamples == 2
    assert s.length_curriculum is None


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"on_policy_fraction": {"kind": "constant", "value": 1.5}}, "on_policy_fraction"),
        ({"on_policy_fraction": {"kind": "piecewise", "boundaries": [3], "values": [0.2, 2.0]}},
         "on_policy_fraction"),
        ({"on_policy_fraction": {"kind": "linear", "lambda0": 1.2, "alpha": -0.1}}, "on_policy_fraction"),
        ({"on_policy_fraction": {"kind": "cosine", "start": 0.0, "end": 3.0, "steps": 5}},
         "on_policy_fraction"),
        ({"reference_field": "prompt"}, "reference_field"),
        ({"reference_field": ""}, "reference_field"),
        ({"max_perplexity": 1.0}, "max_perplexity"),
        ({"max_perplexity": float("nan")}, "max_perplexity"),
        ({"max_resamples": -1}, "max_resamples"),
        ({"length_curriculum": {"start": 8, "step": 2, "gate": 1.0, "max": 4}}, "length_curriculum.start"),
        ({"length_curriculum": {"start": 2, "step": 0, "gate": 1.0, "max": 4}}, "step"),
        ({"length_curriculum": {"start": 2, "step": 2, "gate": 0.0, "max": 4}}, "gate"),
        ({"max_new_tokens": 8, "length_curriculum": {"start": 2, "step": 2, "gate": 1.0, "max": 16}},
         "length_curriculum.max"),
    ],
)  # fmt: skip
def test_bad_options_name_the_field(sampling: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RunSpec.model_validate(
            {"student": "s", "dataset": "d.jsonl", "teachers": [{"name": "t0"}], "sampling": sampling}
        )


# ------------------------------------------------------------------ decision functions (pure)


def test_on_policy_share_follows_the_schedule_and_holds_at_one() -> None:
    ramp = LinearSchedule(kind="linear", lambda0=0.25, alpha=1.0)  # 0.25, 0.5, 0.75, 1.0, 1.25 -> 1
    assert [on_policy_share(ramp, t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    warmup = PiecewiseSchedule(kind="piecewise", boundaries=[2], values=[0.0, 0.5])
    assert [on_policy_share(warmup, t) for t in range(4)] == [0.0, 0.0, 0.5, 0.5]


@pytest.mark.parametrize("share", [0.0, 0.3, 0.75, 1.0])
def test_reference_choice_is_deterministic_with_the_expected_share(share: float) -> None:
    n = 20_000
    picks = [from_reference(7, p, 1, share) for p in range(n)]
    assert picks == [from_reference(7, p, 1, share) for p in range(n)]  # a retried lease agrees
    got = sum(picks) / n
    # binomial std at n = 20000 is <= 0.0036: 5 sigma
    assert abs(got - (1.0 - share)) <= 0.018, got
    if share in (0.0, 1.0):
        assert got == 1.0 - share


def test_reference_choice_depends_on_seed_prompt_and_attempt() -> None:
    base = [from_reference(7, p, 1, 0.5) for p in range(200)]
    assert base != [from_reference(8, p, 1, 0.5) for p in range(200)]
    assert base != [from_reference(7, p, 2, 0.5) for p in range(200)]
    # monotone in the share: a prompt answered by samples at share s still is at any larger share
    for p in range(200):
        if not from_reference(7, p, 1, 0.4):
            assert not from_reference(7, p, 1, 0.6)


def _sample(logprobs: list[float]) -> Sample:
    lp = np.asarray(logprobs, np.float32)
    return Sample(0, 0, [5], [6] * len(lp), lp, np.zeros((len(lp), 0), np.int32))


def test_perplexity_filter_on_hand_built_logprobs() -> None:
    assert perplexity(np.asarray([-1.0, -1.0], np.float32)) == pytest.approx(math.e, rel=1e-6)
    assert perplexity(np.asarray([-0.5, -1.5, -4.0], np.float32)) == pytest.approx(math.exp(2.0), rel=1e-6)
    a, b, c = _sample([-1.0, -1.0]), _sample([-3.0, -5.0]), _sample([-2.0])  # ppl e, e^4, e^2
    kept, flawed = split_flawed([a, b, c], max_perplexity=math.exp(2.0))
    assert kept == [a, c] and flawed == [b]  # e^2 is not above the threshold: kept
    kept, flawed = split_flawed([a, b, c], max_perplexity=2.0)
    assert kept == [] and flawed == [a, b, c]


def test_curriculum_grows_below_the_gate_and_stops_at_max() -> None:
    lc = LengthCurriculumSpec(start=4, step=3, gate=1.5, max=12)
    assert run_state.grow_length(4, 1.0, lc) == 7
    assert run_state.grow_length(4, 1.5, lc) == 4  # at the gate: not below it
    assert run_state.grow_length(4, 2.5, lc) == 4
    lengths = [4]
    for _ in range(5):
        lengths.append(run_state.grow_length(lengths[-1], 0.1, lc))
    assert lengths == [4, 7, 10, 12, 12, 12]


def test_curriculum_length_lives_in_redis(tmp_path: Path) -> None:
    lc = LengthCurriculumSpec(start=4, step=3, gate=1.5, max=12)
    with embedded(tmp_path / "redis") as server:
        client = make_client(server.url)
        assert run_state.read_length(client, "run-1", lc) == 4  # nothing stored: the start
        assert run_state.advance_length(client, "run-1", lc, 0.5, step=1) == 7
        assert run_state.advance_length(client, "run-1", lc, 9.0, step=2) == 7
        # a restarted learner reads it back (it is not reset to start)
        assert run_state.read_length(client, "run-1", lc) == 7
        stored = client.hgetall(keys.length_curriculum("run-1"))
        assert stored == {b"max_new_tokens": b"7", b"step": b"2"}
        assert keys.length_curriculum("run-1") in keys.run_keys("run-1")
        client.close()


def test_entropy_sum_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    p = logits.double().softmax(-1)
    h = -(p * p.log()).sum(-1)
    total = entropy_sum(logits, mask)
    assert float(total[1]) == 7
    assert float(total[0]) == pytest.approx(float(h[mask].sum()), rel=1e-5)
    uniform = entropy_sum(torch.zeros(1, 2, 11), torch.ones(1, 2, dtype=torch.bool))
    assert float(uniform[0] / uniform[1]) == pytest.approx(math.log(11), rel=1e-6)


def test_require_reference_names_the_prompt_and_field() -> None:
    prompts = [Prompt("a", {"answer": "1"}), Prompt("b", {"answer": " "}), Prompt("c", {})]
    require_reference(prompts[:1], "answer")
    with pytest.raises(DatasetError, match=r"prompt 1\.answer"):
        require_reference(prompts, "answer")
    with pytest.raises(DatasetError, match=r"prompt 0\.solution"):
        require_reference(prompts, "solution")


# --------------------------------------------------------------------------------- the record


@pytest.mark.parametrize("flag", [False, True])
def test_record_round_trip_keeps_the_reference_flag(flag: bool) -> None:
    msg = build_rollout(
        run_id="run-1", prompt_id=3, group_index=1, group_size=2, attempt=1, dataset_index=4,
        policy_version=0, token_ids=np.arange(1, 7), response_start=3, from_reference=flag,
    )  # fmt: skip
    decoded = decode_rollout(msg.SerializeToString())
    assert decoded.from_reference is flag
    np.testing.assert_array_equal(decoded.token_ids, np.arange(1, 7))


def test_record_default_is_on_policy() -> None:
    msg = build_rollout(
        run_id="run-1", prompt_id=3, group_index=0, group_size=1, attempt=1, dataset_index=4,
        policy_version=0, token_ids=np.arange(1, 7), response_start=3,
    )  # fmt: skip
    assert decode_rollout(msg.SerializeToString()).from_reference is False


# ------------------------------------------------------------------------------ the objective


@pytest.mark.parametrize("normalization", ["sum_over_k", "per_token_mean"])
def test_sparse_term_ignores_reference_rows(normalization: str) -> None:
    """∇ with the mask == ∇ of (dense over all rows) + (sparse over the on-policy rows only)."""
    cfg = ObjectiveConfig(
        gamma=0.5, teacher_weights=(0.6, 0.4), reward_names=("a", "b"), baseline="leave_one_out",
        normalization=normalization,  # type: ignore[arg-type]
    )  # fmt: skip
    lam = [0.5, 2.0]
    batch = replace(make_batch(b=6), group_ids=torch.tensor([0, 0, 1, 1, 2, 2]))
    on_policy = torch.tensor([True, True, False, False, True, True])  # group 1 is a reference group
    z = batch.logits.clone().requires_grad_(True)
    masked = objective_loss(cfg, replace(batch, logits=z, on_policy=on_policy), lam)
    (g,) = torch.autograd.grad(masked.loss, z)

    dense_only = replace(cfg, gamma=0.0)  # γ = 0 and λ = 0: G = 0, the sparse term vanishes
    z2 = batch.logits.clone().requires_grad_(True)
    dense = objective_loss(dense_only, replace(batch, logits=z2), [0.0, 0.0]).loss
    keep = on_policy.nonzero().squeeze(-1)
    sub = replace(batch, logits=z2[keep], tokens=batch.tokens[keep], mask=batch.mask[keep],
                  teacher_token_logprobs=batch.teacher_token_logprobs[:, keep],
                  teacher_logprobs=batch.teacher_logprobs[:, keep],  # type: ignore[index]
                  rewards=batch.rewards[keep], group_ids=batch.group_ids[keep])  # fmt: skip
    sub_full = objective_loss(cfg, sub, lam)
    sub_dense = objective_loss(dense_only, sub, [0.0, 0.0])
    # the sub-batch's sparse part, rescaled from its normalization to the whole batch's
    scale = len(keep) / 6 if normalization == "sum_over_k" else sub_full.num_tokens / masked.num_tokens
    (g_ref,) = torch.autograd.grad(dense + scale * (sub_full.loss - sub_dense.loss), z2)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    # the reference rows still get the dense term's gradient, and the mask does change the result
    assert float(g[2:4].abs().sum()) > 0
    z3 = batch.logits.clone().requires_grad_(True)
    (g_all,) = torch.autograd.grad(objective_loss(cfg, replace(batch, logits=z3), lam).loss, z3)
    assert not torch.allclose(g_all[2:4], g[2:4])
    torch.testing.assert_close(masked.dense, objective_loss(cfg, replace(batch, logits=z3), lam).dense)


def test_all_true_mask_equals_no_mask() -> None:
    cfg = ObjectiveConfig(gamma=0.5, teacher_weights=(0.6, 0.4), reward_names=("a", "b"))
    batch = make_batch()
    a = objective_loss(cfg, batch, [0.5, 2.0])
    b = objective_loss(cfg, replace(batch, on_policy=torch.ones(6, dtype=torch.bool)), [0.5, 2.0])
    assert torch.equal(a.loss, b.loss) and torch.equal(a.advantage_std, b.advantage_std)


@pytest.mark.parametrize("bad", [torch.ones(5, dtype=torch.bool), torch.ones(6)])
def test_bad_on_policy_mask_names_the_field(bad: torch.Tensor) -> None:
    cfg = ObjectiveConfig(teacher_weights=(0.6, 0.4), reward_names=("a", "b"))
    with pytest.raises(ValueError, match="on_policy"):
        objective_loss(cfg, replace(make_batch(), on_policy=bad), [0.5, 2.0])


# -------------------------------------------------- the worker on a tiny model and a real Redis

RUN = "run-opts00000001"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("student"), TinySpec(vocab_size=64, hidden_size=16, seed=2)
    )


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with embedded(tmp_path / "redis") as server:
        yield server


def _spec(sampling: dict[str, Any]) -> RunSpec:
    return RunSpec.model_validate(
        {"student": "s", "dataset": "d.jsonl", "teachers": [{"name": "t0"}],
         "objective": {"support": "student_top_k", "top_k": 4},
         "sampling": {"responses_per_prompt": 4, "max_new_tokens": 6} | sampling}
    )  # fmt: skip


def _worker_run(student_dir: Path, url: str, spec: RunSpec, coro: Any) -> Any:
    async def go() -> Any:
        client = make_async_client(url)
        try:
            worker = RolloutWorker(WorkerConfig(run_id=RUN, worker_id="w0", seed=5), client)
            student = _Student(
                make_sampler("hf", str(student_dir)), AutoTokenizer.from_pretrained(student_dir)
            )
            run = _Run(spec, [Prompt("w0 w1", {"answer": "w2 w3"})])
            return await coro(worker, run, student)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _counters(url: str) -> dict[str, float]:
    client = make_client(url)
    raw: Any = client.hgetall(keys.producer_counters(RUN))
    client.close()
    return {k.decode(): float(v) for k, v in raw.items()}


def test_worker_resamples_flawed_responses(student_dir: Path, redis_server: EmbeddedRedis) -> None:
    async def first_draw(worker: RolloutWorker, run: _Run, student: _Student) -> list[Sample]:
        cfg = worker._sampling(run.spec, student, 6)
        return (await worker._draw(student, [[4, 5]], cfg))[0]

    probe = _worker_run(student_dir, redis_server.url, _spec({}), first_draw)
    ppl = sorted(perplexity(s.behaviour_logprobs) for s in probe)
    limit = (ppl[1] + ppl[2]) / 2  # half of the first draw is flawed
    spec = _spec({"max_perplexity": limit, "max_resamples": 8})

    async def group(worker: RolloutWorker, run: _Run, student: _Student) -> list[Sample]:
        cfg = worker._sampling(run.spec, student, 6)
        first = (await worker._draw(student, [[4, 5]], cfg))[0]
        return await worker._filter_flawed(run.spec, student, [4, 5], cfg, first)

    got = _worker_run(student_dir, redis_server.url, spec, group)
    counts = _counters(redis_server.url)
    assert len(got) == 4
    flawed_kept = sum(perplexity(s.behaviour_logprobs) > limit for s in got)
    assert counts.get("flawed_kept", 0.0) == flawed_kept
    assert counts["rejected_flawed"] >= 2  # the first draw alone had two
    if not flawed_kept:
        assert all(perplexity(s.behaviour_logprobs) <= limit for s in got)


def test_worker_keeps_the_least_flawed_when_the_bound_is_hit(
    student_dir: Path, redis_server: EmbeddedRedis
) -> None:
    spec = _spec({"max_perplexity": 1.0001, "max_resamples": 1})  # every response is flawed

    async def group(worker: RolloutWorker, run: _Run, student: _Student) -> list[Sample]:
        cfg = worker._sampling(run.spec, student, 6)
        first = (await worker._draw(student, [[4, 5]], cfg))[0]
        return await worker._filter_flawed(run.spec, student, [4, 5], cfg, first)

    got = _worker_run(student_dir, redis_server.url, spec, group)
    assert len(got) == 4
    # 8 drawn (K, then K more), all flawed: the 4 least flawed are kept, 4 dropped
    assert _counters(redis_server.url) == {"rejected_flawed": 4.0, "flawed_kept": 4.0}
    ppl = [perplexity(s.behaviour_logprobs) for s in got]
    assert ppl == sorted(ppl)


def test_reference_group_is_k_copies_of_the_reference(student_dir: Path, redis_server: EmbeddedRedis) -> None:
    spec = _spec({"on_policy_fraction": {"kind": "constant", "value": 0.0}})
    lease = PromptLease(prompt_id=3, attempt=1, dataset_index=0)

    async def go(worker: RolloutWorker, run: _Run, student: _Student) -> Any:
        drawn = await worker._drawn(run, student, [lease])
        return drawn.plans[0], (await worker._groups(run, student, drawn))[0]

    plan, records = _worker_run(student_dir, redis_server.url, spec, go)
    assert plan == _Plan(reference=True, max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(student_dir)
    want = tok.encode("w0 w1") + tok.encode("w2 w3", add_special_tokens=False) + [tok.eos_token_id]
    decoded = [decode_rollout(r.SerializeToString()) for r in records]
    assert [d.group_index for d in decoded] == [0, 1, 2, 3]
    for d in decoded:
        assert d.from_reference and d.token_ids.tolist() == want
        assert d.student_top_ids.shape == (3, 4)  # the student's top-K on the reference, for the support
    # the record holds what a teacher-forced pass of the student gives
    model = make_sampler("hf", str(student_dir)).model  # type: ignore[attr-defined]
    cfg = SamplingConfig(
        responses_per_prompt=4, max_new_tokens=6, record_top_k=4, eos_token_id=tok.eos_token_id
    )
    forced = teacher_forced(model, want[:2], want[2:], cfg)
    np.testing.assert_allclose(decoded[0].sampled_logprobs, forced.behaviour_logprobs, atol=1e-5)
    seq = torch.tensor([want])
    lp = torch.log_softmax(model(input_ids=seq).logits[0, 1:-1].float(), -1)
    np.testing.assert_allclose(
        forced.behaviour_logprobs, lp.gather(-1, seq[0, 2:, None])[:, 0].detach(), atol=1e-5
    )


def test_plan_reads_the_step_and_the_curriculum(student_dir: Path, redis_server: EmbeddedRedis) -> None:
    spec = _spec({
        "on_policy_fraction": {"kind": "piecewise", "boundaries": [3], "values": [0.0, 1.0]},
        "length_curriculum": {"start": 2, "step": 2, "gate": 1.0, "max": 5},
    })  # fmt: skip
    client = make_client(redis_server.url)
    lease = PromptLease(prompt_id=0, attempt=1, dataset_index=0)

    async def plan(worker: RolloutWorker, run: _Run, student: _Student) -> _Plan:
        return (await worker._plans(spec, [lease]))[0]

    assert _worker_run(student_dir, redis_server.url, spec, plan) == _Plan(True, 2)  # no state: step 0
    client.hset(rs.run_state_key(RUN), "step", "3")
    client.hset(keys.length_curriculum(RUN), "max_new_tokens", "9")  # clamped to the curriculum's max
    assert _worker_run(student_dir, redis_server.url, spec, plan) == _Plan(False, 5)
    client.close()


# --------------------------------------------------------------------------------- end to end


@pytest.mark.integration
@pytest.mark.slow
def test_all_three_options_train_the_tiny_task(tmp_path: Path) -> None:
    stack = TrainingStack(tmp_path)
    try:
        run_id = "run-opts00000e2e"
        spec = stack.spec(sampling={
            "responses_per_prompt": 3, "prompts_per_step": 2, "max_new_tokens": 6,
            # GKD warm-up: reference answers while the learner is before step 2, then on-policy
            "on_policy_fraction": {"kind": "piecewise", "boundaries": [2], "values": [0.0, 1.0]},
            "max_perplexity": 1.0001, "max_resamples": 1,  # every sample of a random student is flawed
            "length_curriculum": {"start": 2, "step": 2, "gate": 100.0, "max": 6},  # gate above log V
        })  # fmt: skip
        stack.create_run(run_id, spec)
        stack.worker("w0", "--seed", "1")
        learner = stack.learner(run_id)
        assert learner.proc.wait(120) == 0, learner.log()
        metrics = [
            {k.decode(): float(v) for k, v in f.items()}
            for _, f in stack.client.xrange(rs.run_metrics_key(run_id))  # type: ignore[union-attr]
        ]
    finally:
        stack.close()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # step 1's groups were leased before step 2 began: all references; step 4's after: all samples
    assert metrics[0]["reference_share"] == 1.0 and metrics[-1]["reference_share"] == 0.0
    assert [m["on_policy_fraction"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["reference_share"] in (0.0, 0.5, 1.0) for m in metrics)  # whole groups
    # each on-policy group: K flawed, K more flawed, the K least flawed kept (cumulative counters)
    assert metrics[-1]["rejected_flawed"] == metrics[-1]["flawed_kept"] >= 3
    assert all(m["flawed_kept"] % 3 == 0 for m in metrics)
    # entropy below the gate every step: 2 -> 4 -> 6, then held at max
    assert [m["max_new_tokens"] for m in metrics] == [4, 6, 6, 6]
    assert all(0 < m["student_entropy"] <= math.log(64) + 1e-6 for m in metrics)
    assert all(m["dense_kl"] > 0 for m in metrics)


def test_sampling_seeds_follow_the_run_seed_and_the_worker() -> None:
    from services.rollout.worker import sampling_rng

    def first(run_seed: int, worker_seed: int) -> list[int]:
        return sampling_rng(run_seed, worker_seed).integers(2**31, size=4).tolist()

    assert first(0, 7) == first(0, 7)
    assert first(0, 7) != first(1, 7) and first(0, 7) != first(0, 8)
