"""The rollout record round-trips, and every malformed record is refused naming its field."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from contracts import keys
from contracts.rollout_record import RolloutDecodeError, decode_rollout, rollout_id
from proto.distill.v1 import reward_pb2, rollout_pb2
from services.rollout.queue import PromptLease
from tests.redis_fixtures import synthetic_group


def _record() -> rollout_pb2.Rollout:
    return synthetic_group("run-1", PromptLease(3, 1, 3), 2, tokens=10, top_k=4)[1]


def test_round_trip_keeps_every_array() -> None:
    rec = _record()
    out = decode_rollout(rec.SerializeToString())
    assert out.rollout_id == rollout_id("run-1", 3, 1, 1) == rec.rollout_id
    assert (out.prompt_id, out.group_index, out.group_size, out.attempt) == (3, 1, 2, 1)
    assert out.token_ids.dtype == np.int32 and out.token_ids.shape == (10,)
    p = out.num_positions
    assert out.student_top_ids.shape == (p, 4) and out.sampled_logprobs.shape == (p,)
    teacher = out.teachers[0]
    assert teacher.top_ids.shape == (p, 4) and teacher.candidate_logprobs.shape == (p, 4)
    assert teacher.top_logprobs.dtype == np.float32 and np.all(teacher.top_logprobs <= 0)
    assert out.rewards[0].status == reward_pb2.REWARD_STATUS_OK


def test_ids_are_deterministic_and_distinct() -> None:
    ids = {rollout_id("r", p, g, a) for p in range(5) for g in range(4) for a in range(3)}
    assert len(ids) == 60
    assert rollout_id("r", 1, 2, 3) == rollout_id("r", 1, 2, 3) != rollout_id("s", 1, 2, 3)


def _nan_teacher(rec: rollout_pb2.Rollout) -> None:
    arr = np.frombuffer(rec.teachers[0].top_logprobs, "<f2").copy()
    arr[3] = np.nan
    rec.teachers[0].top_logprobs = arr.tobytes()


def _repeat_top_id(rec: rollout_pb2.Rollout) -> None:
    ids = np.frombuffer(rec.student_top_ids, "<i4").copy().reshape(-1, rec.student_top_k)
    ids[0, 1] = ids[0, 0]
    rec.student_top_ids = ids.tobytes()


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [
        (lambda r: setattr(r, "schema_version", 2), "schema_version", "decode"),
        (lambda r: setattr(r, "token_ids", r.token_ids[:-1]), "token_ids", "decode"),
        (lambda r: setattr(r, "response_start", 10), "response_start", "decode"),
        (lambda r: setattr(r, "group_index", 2), "group_index", "decode"),
        (lambda r: setattr(r, "student_top_ids", r.student_top_ids[:-4]), "student_top_ids", "decode"),
        (lambda r: setattr(r, "token_ids", np.full(10, -1, "<i4").tobytes()), "token_ids", "decode"),
        (_nan_teacher, "teachers[0].top_logprobs", "nonfinite"),
        (_repeat_top_id, "student_top_ids", "decode"),
        (lambda r: setattr(r.teachers[0], "num_candidates", 3), "teachers[0].num_candidates", "decode"),
        (lambda r: setattr(r.rewards[0], "value", float("inf")), "rewards[0].value", "nonfinite"),
        (lambda r: setattr(r.rewards[0], "status", 0), "rewards[0].status", "decode"),
    ],
)
def test_malformed_records_name_the_field(
    mutate: Callable[[rollout_pb2.Rollout], None], field: str, reason: str
) -> None:
    rec = _record()
    mutate(rec)
    with pytest.raises(RolloutDecodeError) as err:
        decode_rollout(rec.SerializeToString())
    assert err.value.field == field and err.value.reason == reason


def test_garbage_bytes_are_a_decode_error() -> None:
    with pytest.raises(RolloutDecodeError) as err:
        decode_rollout(b"\xff\xff\xff not protobuf")
    assert err.value.field == "payload"


def test_failed_reward_values_are_not_checked() -> None:
    rec = _record()
    rec.rewards[0].status = reward_pb2.REWARD_STATUS_TIMEOUT
    rec.rewards[0].value = float("nan")
    assert decode_rollout(rec.SerializeToString()).rewards[0].status == reward_pb2.REWARD_STATUS_TIMEOUT


@pytest.mark.parametrize("bad", ["", "a:b", "with space", "x*", "-lead", "a" * 129])
def test_key_names_refuse_bad_run_ids(bad: str) -> None:
    with pytest.raises(keys.InvalidRunId, match="run_id"):
        keys.rollout_stream(bad)


def test_key_names_share_the_run_prefix() -> None:
    names = keys.run_keys("run-1")
    assert len(set(names)) == len(names)
    assert all(n.startswith("distill:run:run-1:") for n in names)
