"""Build, encode and validate the rollout record (``proto/distill/v1/rollout.proto``).

The worker calls :func:`build_rollout` with numpy arrays and :func:`rollout_id`; the learner calls
:func:`decode_rollout`, which either returns every array decoded and checked (shapes agree, ids are
non-negative, every log-prob and reward value is finite) or raises :class:`RolloutDecodeError`
naming the field. A record that fails here is dead-lettered, never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from contracts.tensors import DType, encode
from proto.distill.v1 import reward_pb2, rollout_pb2

SCHEMA_VERSION = 1
IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]


class RolloutDecodeError(ValueError):
    """A rollout that may not reach the gradient. ``reason`` is ``decode`` or ``nonfinite``."""

    def __init__(self, field: str, message: str, reason: str = "decode") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


def rollout_id(run_id: str, prompt_id: int, group_index: int, attempt: int) -> str:
    """Deterministic id of one sampled response: a retry of the same sample gets the same id."""
    key = f"{run_id}\x00{prompt_id}\x00{group_index}\x00{attempt}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


@dataclass
class TeacherArrays:
    """One teacher's scores; decoded log-probs are float32 whatever the wire dtype was."""

    teacher: str
    token_logprobs: FloatArray  # (P,)
    top_ids: IntArray  # (P, top_k)
    top_logprobs: FloatArray  # (P, top_k)
    candidate_logprobs: FloatArray  # (P, num_candidates)


@dataclass
class Reward:
    name: str
    value: float
    status: int  # reward_pb2.RewardStatus
    detail: str = ""


@dataclass
class DecodedRollout:
    rollout_id: str
    run_id: str
    prompt_id: int
    group_index: int
    group_size: int
    attempt: int
    dataset_index: int
    policy_version: int
    token_ids: IntArray  # (L,)
    response_start: int
    sampled_logprobs: FloatArray  # (P,) or (0,) when the worker did not record them
    student_top_ids: IntArray  # (P, k) or (P, 0)
    teachers: list[TeacherArrays] = field(default_factory=list)
    rewards: list[Reward] = field(default_factory=list)
    # The response is the dataset's reference, not a sample of the student (seed 002 ch. 4): the
    # learner's sparse (score-function) term must not use it.
    from_reference: bool = False

    @property
    def num_positions(self) -> int:
        return int(self.token_ids.shape[0]) - self.response_start


def _dtype(value: int) -> DType:
    return "float16" if value == rollout_pb2.SCORE_DTYPE_FLOAT16 else "float32"


def build_rollout(
    *,
    run_id: str,
    prompt_id: int,
    group_index: int,
    group_size: int,
    attempt: int,
    dataset_index: int,
    policy_version: int,
    token_ids: npt.ArrayLike,
    response_start: int,
    sampled_logprobs: npt.ArrayLike | None = None,
    student_top_ids: npt.ArrayLike | None = None,
    teachers: list[TeacherArrays] | None = None,
    rewards: list[Reward] | None = None,
    logprob_dtype: DType = "float16",
    worker_id: str = "",
    created_unix: float = 0.0,
    from_reference: bool = False,
) -> rollout_pb2.Rollout:
    """The record of one response; teacher log-probs are packed as ``logprob_dtype``."""
    top = np.zeros((0, 0), np.int32) if student_top_ids is None else np.asarray(student_top_ids)
    msg = rollout_pb2.Rollout(
        schema_version=SCHEMA_VERSION,
        rollout_id=rollout_id(run_id, prompt_id, group_index, attempt),
        run_id=run_id, prompt_id=prompt_id, group_index=group_index, group_size=group_size,
        attempt=attempt, dataset_index=dataset_index, policy_version=policy_version,
        token_ids=encode(token_ids, "int32"), response_start=response_start,
        sampled_logprobs=b"" if sampled_logprobs is None else encode(sampled_logprobs, "float32"),
        student_top_k=int(top.shape[1]) if top.ndim == 2 else 0,
        student_top_ids=encode(top, "int32") if top.size else b"",
        worker_id=worker_id, created_unix=created_unix, from_reference=from_reference,
    )  # fmt: skip
    wire = rollout_pb2.SCORE_DTYPE_FLOAT16 if logprob_dtype == "float16" else rollout_pb2.SCORE_DTYPE_FLOAT32
    for t in teachers or []:
        msg.teachers.add(
            teacher=t.teacher, dtype=wire, top_k=int(t.top_ids.shape[1]) if t.top_ids.ndim == 2 else 0,
            num_candidates=int(t.candidate_logprobs.shape[1]) if t.candidate_logprobs.ndim == 2 else 0,
            token_logprobs=encode(t.token_logprobs, logprob_dtype), top_ids=encode(t.top_ids, "int32"),
            top_logprobs=encode(t.top_logprobs, logprob_dtype),
            candidate_logprobs=encode(t.candidate_logprobs, logprob_dtype),
        )  # fmt: skip
    for r in rewards or []:
        msg.rewards.add(name=r.name, value=r.value, status=r.status, detail=r.detail)
    return msg


# The learner decodes ~12 arrays per rollout on its hot path; contracts.tensors.decode does the same
# job with more general checks whose Python overhead was half of the consumer's CPU time
# (benchmarks/bench_queue.py), so the record keeps this lean variant of the same wire format.
_WIRE: dict[str, tuple[np.dtype[Any], np.dtype[Any]]] = {
    "int32": (np.dtype("<i4"), np.dtype(np.int32)),
    "float16": (np.dtype("<f2"), np.dtype(np.float32)),
    "float32": (np.dtype("<f4"), np.dtype(np.float32)),
}


def _array(data: bytes, dtype: DType, shape: tuple[int, ...], name: str) -> Any:
    """Decoded into a fresh native array (int32, or float32 for log-probs) and checked: byte length
    matches ``shape``, ids are non-negative, floats are finite."""
    wire, native = _WIRE[dtype]
    count = 1
    for d in shape:
        count *= d
    expected = count * wire.itemsize
    if len(data) != expected:
        raise RolloutDecodeError(name, f"{len(data)} bytes do not hold {dtype} {shape} ({expected} expected)")
    arr = np.frombuffer(data, dtype=wire).astype(native).reshape(shape)
    if not count:
        return arr
    if dtype == "int32":
        if arr.min() < 0:
            raise RolloutDecodeError(name, "negative token id")
    elif not np.isfinite(arr.sum(dtype=np.float64)):
        # NaN or ±inf anywhere makes the sum non-finite; -inf + inf gives NaN, still caught.
        raise RolloutDecodeError(name, "NaN or infinite value", reason="nonfinite")
    return arr


def _header(msg: rollout_pb2.Rollout) -> None:
    if msg.schema_version != SCHEMA_VERSION:
        raise RolloutDecodeError("schema_version", f"{msg.schema_version} is not {SCHEMA_VERSION}")
    if not msg.rollout_id:
        raise RolloutDecodeError("rollout_id", "empty")
    if msg.group_size < 1 or msg.group_index >= msg.group_size:
        raise RolloutDecodeError("group_index", f"{msg.group_index} not in [0, group_size={msg.group_size})")


def _teacher(t: rollout_pb2.RolloutTeacherScores, p: int, k_student: int, i: int) -> TeacherArrays:
    name, dt = f"teachers[{i}]", _dtype(t.dtype)
    if t.num_candidates not in (0, k_student):
        raise RolloutDecodeError(f"{name}.num_candidates", f"{t.num_candidates} != student_top_k {k_student}")
    return TeacherArrays(
        teacher=t.teacher,
        token_logprobs=_array(t.token_logprobs, dt, (p,), f"{name}.token_logprobs"),
        top_ids=_array(t.top_ids, "int32", (p, t.top_k), f"{name}.top_ids"),
        top_logprobs=_array(t.top_logprobs, dt, (p, t.top_k), f"{name}.top_logprobs"),
        candidate_logprobs=_array(
            t.candidate_logprobs, dt, (p, t.num_candidates), f"{name}.candidate_logprobs"
        ),
    )


def _reward(r: rollout_pb2.RolloutReward, i: int) -> Reward:
    if not r.name:
        raise RolloutDecodeError(f"rewards[{i}].name", "empty")
    if r.status not in reward_pb2.RewardStatus.values() or r.status == reward_pb2.REWARD_STATUS_UNSPECIFIED:
        raise RolloutDecodeError(f"rewards[{i}].status", f"unknown status {r.status}")
    if r.status == reward_pb2.REWARD_STATUS_OK and not np.isfinite(r.value):
        raise RolloutDecodeError(f"rewards[{i}].value", f"{r.value} is not finite", reason="nonfinite")
    return Reward(name=r.name, value=r.value, status=r.status, detail=r.detail)


def _check_distinct(ids: npt.NDArray[np.generic], name: str) -> None:
    """A support lists each id once per position: a repeat would count its mass twice."""
    if ids.ndim == 2 and ids.shape[1] > 1:
        ordered = np.sort(ids, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise RolloutDecodeError(name, "an id appears twice at one position")


def decode_rollout(data: bytes) -> DecodedRollout:
    """Parse and validate one record; :class:`RolloutDecodeError` names the first bad field."""
    msg = rollout_pb2.Rollout()
    try:
        msg.ParseFromString(data)
    except DecodeError as err:
        raise RolloutDecodeError("payload", f"not a Rollout message ({err})") from err
    _header(msg)
    if len(msg.token_ids) % 4:
        raise RolloutDecodeError("token_ids", f"{len(msg.token_ids)} bytes is not a multiple of 4 (int32)")
    length = len(msg.token_ids) // 4
    if not 1 <= msg.response_start < length:
        raise RolloutDecodeError("response_start", f"{msg.response_start} not in [1, {length})")
    tokens = _array(msg.token_ids, "int32", (length,), "token_ids")
    p, k = length - msg.response_start, msg.student_top_k
    sampled = _array(msg.sampled_logprobs, "float32", (p if msg.sampled_logprobs else 0,), "sampled_logprobs")
    top_ids = _array(msg.student_top_ids, "int32", (p, k), "student_top_ids")
    _check_distinct(top_ids, "student_top_ids")
    return DecodedRollout(
        rollout_id=msg.rollout_id, run_id=msg.run_id, prompt_id=msg.prompt_id,
        group_index=msg.group_index, group_size=msg.group_size, attempt=msg.attempt,
        dataset_index=msg.dataset_index, policy_version=msg.policy_version,
        token_ids=tokens, response_start=msg.response_start, sampled_logprobs=sampled,
        student_top_ids=top_ids,
        teachers=[_teacher(t, p, k, i) for i, t in enumerate(msg.teachers)],
        rewards=[_reward(r, i) for i, r in enumerate(msg.rewards)],
        from_reference=msg.from_reference,
    )  # fmt: skip
