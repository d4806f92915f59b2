"""Rollouts → learner tensors: logits line up with the tokens they predict; supports and rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.rollout_record import DecodedRollout, Reward, TeacherArrays
from learner.batching import (
    BatchError,
    check_vocab,
    objective_batch,
    pack_sequences,
    response_logits,
    response_tokens,
    rewards_matrix,
    support,
)
from proto.distill.v1 import reward_pb2

OK, TIMEOUT = reward_pb2.REWARD_STATUS_OK, reward_pb2.REWARD_STATUS_TIMEOUT


def rollout(
    tokens: list[int],
    start: int,
    prompt_id: int = 0,
    k: int = 2,
    rewards: list[Reward] | None = None,
    seed: int = 0,
) -> DecodedRollout:
    rng = np.random.default_rng(seed)
    p = len(tokens) - start
    student_ids = np.stack([rng.permutation(16)[:k] for _ in range(p)]).astype(np.int32)
    teacher = TeacherArrays(
        teacher="t0",
        token_logprobs=-rng.random(p, dtype=np.float32),
        top_ids=np.stack([rng.permutation(16)[:k] for _ in range(p)]).astype(np.int32),
        top_logprobs=-rng.random((p, k), dtype=np.float32),
        candidate_logprobs=-rng.random((p, k), dtype=np.float32),
    )
    return DecodedRollout(
        rollout_id=f"r{seed}", run_id="run-x", prompt_id=prompt_id, group_index=0, group_size=1, attempt=1,
        dataset_index=0, policy_version=0, token_ids=np.asarray(tokens, np.int32), response_start=start,
        sampled_logprobs=np.zeros(p, np.float32), student_top_ids=student_ids, teachers=[teacher],
        rewards=rewards or [],
    )  # fmt: skip


def test_response_logits_are_the_positions_that_predict_each_response_token() -> None:
    rollouts = [rollout([5, 6, 7, 8, 9], 2), rollout([1, 2, 3], 1, seed=1)]
    packed = pack_sequences(rollouts)
    # fake "logits": the position index, so we can read which position was taken
    positions = torch.arange(packed.input_ids.shape[1], dtype=torch.float32)
    logits = positions[None, :, None].expand(2, -1, 4).clone()
    got, (tokens, mask) = response_logits(logits, packed), response_tokens(packed)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert got[0, :, 0].tolist() == [1.0, 2.0, 3.0]  # position s-1+t predicts token s+t
    assert got[1, :2, 0].tolist() == [0.0, 1.0]
    assert tokens[0].tolist() == [7, 8, 9] and tokens[1, :2].tolist() == [2, 3]


def test_union_support_adds_the_teachers_ids_not_already_in_the_students() -> None:
    r = rollout([1, 2, 3, 4], 2, k=3)
    r.teachers[0].top_ids[0] = (
        [r.student_top_ids[0, 1], 11, 12] if 11 not in r.student_top_ids[0] else [0, 1, 2]
    )
    ids, lp = support([r], ["t0"], "union", width=2, vocab=16)
    assert ids is not None and lp is not None
    assert ids.shape == (1, 2, 6) and lp.shape == (1, 1, 2, 6)
    for t in range(2):
        row = [i for i in ids[0, t].tolist() if i >= 0]
        assert len(row) == len(set(row)), "no id twice in one support row"
        assert set(row) == set(r.student_top_ids[t].tolist()) | set(r.teachers[0].top_ids[t].tolist())


def test_teacher_top_k_with_two_teachers_is_refused_naming_the_field() -> None:
    r = rollout([1, 2, 3], 1)
    t0 = r.teachers[0]
    r.teachers.append(
        TeacherArrays("t1", t0.token_logprobs, t0.top_ids, t0.top_logprobs, t0.candidate_logprobs)
    )
    with pytest.raises(BatchError, match=r"objective\.support"):
        support([r], ["t0", "t1"], "teacher_top_k", width=2, vocab=16)


def test_failed_rewards_are_reported_or_replaced_by_the_explicit_failure_value() -> None:
    good = rollout([1, 2], 1, rewards=[Reward("acc", 1.0, OK)])
    bad = rollout([1, 2], 1, rewards=[Reward("acc", 0.0, TIMEOUT, "verifier timed out")], seed=1)
    values, failed = rewards_matrix([good, bad], ["acc"], [None])
    assert failed == [1] and values[0, 0] == 1.0
    values, failed = rewards_matrix([good, bad], ["acc"], [-0.5])
    assert failed == [] and values[:, 0].tolist() == [1.0, -0.5]


def test_objective_batch_shapes_and_groups() -> None:
    rollouts = [rollout([1, 2, 3, 4], 2, prompt_id=7), rollout([1, 2, 3], 2, prompt_id=7, seed=1),
                rollout([4, 5, 6], 1, prompt_id=8, seed=2)]  # fmt: skip
    packed = pack_sequences(rollouts)
    logits = response_logits(torch.randn(3, packed.input_ids.shape[1], 16), packed)
    rewards, _ = rewards_matrix(rollouts, [], [])
    batch = objective_batch(logits, packed, rollouts, ["t0"], "student_top_k", rewards)
    assert batch.logits.shape == (3, 2, 16) and batch.teacher_token_logprobs.shape == (1, 3, 2)
    assert batch.support_ids is not None and batch.support_ids.shape == (3, 2, 2)
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.mask.tolist() == [[True, True], [True, False], [True, True]]


def test_ids_outside_the_students_vocabulary_are_refused_naming_the_field() -> None:
    r = rollout([1, 2, 3], 1)
    check_vocab(r, 16)
    r.teachers[0].top_ids[0, 0] = 16
    with pytest.raises(BatchError, match=r"teachers\[0\]\.top_ids"):
        check_vocab(r, 16)
    with pytest.raises(BatchError, match="token_ids"):
        check_vocab(rollout([1, 2, 99], 1), 16)
