from proto.distill.v1 import reward_pb2 as _reward_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_DTYPE_UNSPECIFIED: _ClassVar[ScoreDType]
    SCORE_DTYPE_FLOAT32: _ClassVar[ScoreDType]
    SCORE_DTYPE_FLOAT16: _ClassVar[ScoreDType]
SCORE_DTYPE_UNSPECIFIED: ScoreDType
SCORE_DTYPE_FLOAT32: ScoreDType
SCORE_DTYPE_FLOAT16: ScoreDType

class RolloutTeacherScores(_message.Message):
    __slots__ = ("teacher", "dtype", "top_k", "num_candidates", "token_logprobs", "top_ids", "top_logprobs", "candidate_logprobs")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    dtype: ScoreDType
    top_k: int
    num_candidates: int
    token_logprobs: bytes
    top_ids: bytes
    top_logprobs: bytes
    candidate_logprobs: bytes
    def __init__(self, teacher: _Optional[str] = ..., dtype: _Optional[_Union[ScoreDType, str]] = ..., top_k: _Optional[int] = ..., num_candidates: _Optional[int] = ..., token_logprobs: _Optional[bytes] = ..., top_ids: _Optional[bytes] = ..., top_logprobs: _Optional[bytes] = ..., candidate_logprobs: _Optional[bytes] = ...) -> None: ...

class RolloutReward(_message.Message):
    __slots__ = ("name", "value", "status", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    status: _reward_pb2.RewardStatus
    detail: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., status: _Optional[_Union[_reward_pb2.RewardStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("schema_version", "rollout_id", "run_id", "prompt_id", "group_index", "group_size", "attempt", "dataset_index", "token_ids", "response_start", "policy_version", "sampled_logprobs", "student_top_k", "student_top_ids", "teachers", "rewards", "worker_id", "created_unix", "from_reference")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DATASET_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    STUDENT_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FROM_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    rollout_id: str
    run_id: str
    prompt_id: int
    group_index: int
    group_size: int
    attempt: int
    dataset_index: int
    token_ids: bytes
    response_start: int
    policy_version: int
    sampled_logprobs: bytes
    student_top_k: int
    student_top_ids: bytes
    teachers: _containers.RepeatedCompositeFieldContainer[RolloutTeacherScores]
    rewards: _containers.RepeatedCompositeFieldContainer[RolloutReward]
    worker_id: str
    created_unix: float
    from_reference: bool
    def __init__(self, schema_version: _Optional[int] = ..., rollout_id: _Optional[str] = ..., run_id: _Optional[str] = ..., prompt_id: _Optional[int] = ..., group_index: _Optional[int] = ..., group_size: _Optional[int] = ..., attempt: _Optional[int] = ..., dataset_index: _Optional[int] = ..., token_ids: _Optional[bytes] = ..., response_start: _Optional[int] = ..., policy_version: _Optional[int] = ..., sampled_logprobs: _Optional[bytes] = ..., student_top_k: _Optional[int] = ..., student_top_ids: _Optional[bytes] = ..., teachers: _Optional[_Iterable[_Union[RolloutTeacherScores, _Mapping]]] = ..., rewards: _Optional[_Iterable[_Union[RolloutReward, _Mapping]]] = ..., worker_id: _Optional[str] = ..., created_unix: _Optional[float] = ..., from_reference: _Optional[bool] = ...) -> None: ...
