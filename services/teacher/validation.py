"""Turn a wire ``ScoreRequest`` into domain objects, refusing bad input with the field's name.

Every check runs before any scoring, so a refused request changes nothing. ``InvalidRequest``
becomes INVALID_ARGUMENT at the gRPC edge, ``Unsupported`` FAILED_PRECONDITION.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from contracts.tensors import DType, TensorDecodeError, decode, decode_vector
from proto.distill.v1 import teacher_pb2
from services.teacher.domain import IntArray, InvalidRequest, ScoreItem, ScoreParams, TeacherInfo, Unsupported

_DTYPES: dict[int, DType] = {
    teacher_pb2.LOGPROB_DTYPE_UNSPECIFIED: "float32",
    teacher_pb2.LOGPROB_DTYPE_FLOAT32: "float32",
    teacher_pb2.LOGPROB_DTYPE_FLOAT16: "float16",
}


@dataclass(frozen=True)
class ParsedScore:
    items: list[ScoreItem]
    params: ScoreParams
    dtype: DType  # log-prob encoding of the reply


def parse_score_request(req: teacher_pb2.ScoreRequest, info: TeacherInfo) -> ParsedScore:
    """Validate ``req`` against the teacher described by ``info``; raise on the first bad field."""
    if (
        req.expected_tokenizer_fingerprint
        and req.expected_tokenizer_fingerprint != info.tokenizer_fingerprint
    ):
        raise Unsupported(
            f"expected_tokenizer_fingerprint: caller has {req.expected_tokenizer_fingerprint}, "
            f"teacher {info.model_name} has {info.tokenizer_fingerprint}"
        )
    dtype = _DTYPES.get(req.logprob_dtype)
    if dtype is None:
        raise InvalidRequest("logprob_dtype", f"unknown value {req.logprob_dtype}")
    params = _parse_params(req, info)
    if not req.sequences:
        raise InvalidRequest("sequences", "empty batch: send at least one sequence")
    items = [_parse_sequence(i, seq, req.num_candidates, info) for i, seq in enumerate(req.sequences)]
    return ParsedScore(items=items, params=params, dtype=dtype)


def _parse_params(req: teacher_pb2.ScoreRequest, info: TeacherInfo) -> ScoreParams:
    limit = min(info.max_top_k, info.vocab_size)
    if req.top_k > limit:
        raise InvalidRequest("top_k", f"{req.top_k} is over this teacher's cap of {limit}")
    temperature = req.temperature if req.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise InvalidRequest("temperature", f"must be a finite number > 0, got {temperature}")
    if temperature != 1.0 and not info.temperature_scaling:
        raise Unsupported(f"temperature: backend {info.backend} scores at temperature 1 only")
    if req.num_candidates and not info.candidate_scoring:
        raise Unsupported(
            f"num_candidates: backend {info.backend} cannot score arbitrary candidate ids; "
            "send num_candidates=0 or use a teacher with the hf backend"
        )
    if req.num_candidates > info.vocab_size:
        raise InvalidRequest("num_candidates", f"{req.num_candidates} is over the vocabulary size")
    return ScoreParams(top_k=req.top_k, temperature=temperature)


def _check_ids(ids: IntArray, vocab_size: int, field: str) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        where = np.unravel_index(int(bad[0]), ids.shape)
        index = "".join(f"[{int(w)}]" for w in where)
        raise InvalidRequest(
            f"{field}{index}", f"id {int(ids[where])} is outside the vocabulary [0, {vocab_size})"
        )


def _parse_sequence(
    i: int, seq: teacher_pb2.ScoreSequence, num_candidates: int, info: TeacherInfo
) -> ScoreItem:
    field = f"sequences[{i}]"
    try:
        ids = decode_vector(seq.token_ids, "int32", f"{field}.token_ids").astype(np.int32)
    except TensorDecodeError as err:
        raise InvalidRequest(err.field, err.reason) from err
    length = int(ids.shape[0])
    if length == 0:
        raise InvalidRequest(f"{field}.token_ids", "empty sequence")
    if length > info.max_sequence_length:
        raise InvalidRequest(
            f"{field}.token_ids", f"length {length} is over max_sequence_length {info.max_sequence_length}"
        )
    if not 1 <= seq.response_start < length:
        raise InvalidRequest(
            f"{field}.response_start",
            f"{seq.response_start} must satisfy 1 <= response_start < len(token_ids) = {length}",
        )
    _check_ids(ids, info.vocab_size, f"{field}.token_ids")
    positions = length - seq.response_start
    try:
        cands = decode(
            seq.candidate_ids, "int32", (positions, num_candidates), f"{field}.candidate_ids"
        ).astype(np.int32)
    except TensorDecodeError as err:
        raise InvalidRequest(err.field, err.reason) from err
    _check_ids(cands, info.vocab_size, f"{field}.candidate_ids")
    return ScoreItem(token_ids=ids, response_start=int(seq.response_start), candidate_ids=cands)
