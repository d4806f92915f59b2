from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogprobDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOGPROB_DTYPE_UNSPECIFIED: _ClassVar[LogprobDType]
    LOGPROB_DTYPE_FLOAT32: _ClassVar[LogprobDType]
    LOGPROB_DTYPE_FLOAT16: _ClassVar[LogprobDType]
LOGPROB_DTYPE_UNSPECIFIED: LogprobDType
LOGPROB_DTYPE_FLOAT32: LogprobDType
LOGPROB_DTYPE_FLOAT16: LogprobDType

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("candidate_scoring", "temperature_scaling", "max_top_k", "max_batch_tokens", "max_message_bytes")
    CANDIDATE_SCORING_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_SCALING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    candidate_scoring: bool
    temperature_scaling: bool
    max_top_k: int
    max_batch_tokens: int
    max_message_bytes: int
    def __init__(self, candidate_scoring: _Optional[bool] = ..., temperature_scaling: _Optional[bool] = ..., max_top_k: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_name", "vocab_size", "tokenizer_fingerprint", "max_sequence_length", "backend", "capabilities")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    backend: str
    capabilities: Capabilities
    def __init__(self, model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., max_sequence_length: _Optional[int] = ..., backend: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class ScoreSequence(_message.Message):
    __slots__ = ("token_ids", "response_start", "candidate_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: bytes
    response_start: int
    candidate_ids: bytes
    def __init__(self, token_ids: _Optional[bytes] = ..., response_start: _Optional[int] = ..., candidate_ids: _Optional[bytes] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("sequences", "top_k", "num_candidates", "temperature", "logprob_dtype", "expected_tokenizer_fingerprint")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[ScoreSequence]
    top_k: int
    num_candidates: int
    temperature: float
    logprob_dtype: LogprobDType
    expected_tokenizer_fingerprint: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[ScoreSequence, _Mapping]]] = ..., top_k: _Optional[int] = ..., num_candidates: _Optional[int] = ..., temperature: _Optional[float] = ..., logprob_dtype: _Optional[_Union[LogprobDType, str]] = ..., expected_tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class SequenceScores(_message.Message):
    __slots__ = ("num_positions", "token_logprobs", "top_ids", "top_logprobs", "candidate_logprobs", "outside_mass")
    NUM_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    OUTSIDE_MASS_FIELD_NUMBER: _ClassVar[int]
    num_positions: int
    token_logprobs: bytes
    top_ids: bytes
    top_logprobs: bytes
    candidate_logprobs: bytes
    outside_mass: bytes
    def __init__(self, num_positions: _Optional[int] = ..., token_logprobs: _Optional[bytes] = ..., top_ids: _Optional[bytes] = ..., top_logprobs: _Optional[bytes] = ..., candidate_logprobs: _Optional[bytes] = ..., outside_mass: _Optional[bytes] = ...) -> None: ...

class ScoreReply(_message.Message):
    __slots__ = ("scores", "logprob_dtype", "top_k", "num_candidates")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[SequenceScores]
    logprob_dtype: LogprobDType
    top_k: int
    num_candidates: int
    def __init__(self, scores: _Optional[_Iterable[_Union[SequenceScores, _Mapping]]] = ..., logprob_dtype: _Optional[_Union[LogprobDType, str]] = ..., top_k: _Optional[int] = ..., num_candidates: _Optional[int] = ...) -> None: ...
