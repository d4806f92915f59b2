"""Domain ↔ protobuf for teacher scoring, used by both the server and the client.

Sizes: a reply costs per response position 4 bytes (int32) per top-K id plus one log-prob each
for the top-K, the candidates, the actual token and the outside mass; ``reply_bytes`` estimates
it (plus protobuf framing) so that the server can refuse and the client can split in advance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contracts.tensors import DType, TensorDecodeError, decode, encode, itemsize
from proto.distill.v1 import teacher_pb2
from services.teacher.domain import ItemScores, ScoreItem, ScoreParams, TeacherError, TeacherInfo

_TO_WIRE = {"float32": teacher_pb2.LOGPROB_DTYPE_FLOAT32, "float16": teacher_pb2.LOGPROB_DTYPE_FLOAT16}
_FROM_WIRE: dict[int, DType] = {v: k for k, v in _TO_WIRE.items()}  # type: ignore[misc]
FRAMING_BYTES = 48  # upper bound on protobuf tags and length varints per sequence (at most 42)


class MalformedReply(TeacherError):
    """A reply that does not match its request (a server bug or a version mismatch)."""


def position_bytes(top_k: int, num_candidates: int, dtype: DType) -> int:
    """Reply bytes per response position."""
    return top_k * 4 + (top_k + num_candidates + 2) * itemsize(dtype)


def reply_bytes(positions: Sequence[int], top_k: int, num_candidates: int, dtype: DType) -> int:
    """Upper estimate of the reply size for sequences with ``positions`` response positions each."""
    per = position_bytes(top_k, num_candidates, dtype)
    return sum(p * per + FRAMING_BYTES for p in positions) + FRAMING_BYTES


def request_bytes(item: ScoreItem) -> int:
    """Upper estimate of one sequence's share of a request."""
    return 4 * (item.token_ids.size + item.candidate_ids.size) + FRAMING_BYTES


def info_to_wire(info: TeacherInfo, max_message_bytes: int) -> teacher_pb2.InfoReply:
    caps = teacher_pb2.Capabilities(
        candidate_scoring=info.candidate_scoring,
        temperature_scaling=info.temperature_scaling,
        max_top_k=info.max_top_k,
        max_batch_tokens=info.max_batch_tokens,
        max_message_bytes=max_message_bytes,
    )
    return teacher_pb2.InfoReply(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        max_sequence_length=info.max_sequence_length,
        backend=info.backend,
        capabilities=caps,
    )


def info_from_wire(reply: teacher_pb2.InfoReply) -> TeacherInfo:
    caps = reply.capabilities
    return TeacherInfo(
        model_name=reply.model_name,
        vocab_size=reply.vocab_size,
        tokenizer_fingerprint=reply.tokenizer_fingerprint,
        max_sequence_length=reply.max_sequence_length,
        backend=reply.backend,
        candidate_scoring=caps.candidate_scoring,
        temperature_scaling=caps.temperature_scaling,
        max_top_k=caps.max_top_k,
        max_batch_tokens=caps.max_batch_tokens,
    )


def encode_reply(
    scores: Sequence[ItemScores], params: ScoreParams, dtype: DType, num_candidates: int
) -> teacher_pb2.ScoreReply:
    out = [
        teacher_pb2.SequenceScores(
            num_positions=int(s.token_logprobs.shape[0]),
            token_logprobs=encode(s.token_logprobs, dtype),
            top_ids=encode(s.top_ids, "int32"),
            top_logprobs=encode(s.top_logprobs, dtype),
            candidate_logprobs=encode(s.candidate_logprobs, dtype),
            outside_mass=encode(s.outside_mass, dtype),
        )
        for s in scores
    ]
    return teacher_pb2.ScoreReply(
        scores=out, logprob_dtype=_TO_WIRE[dtype], top_k=params.top_k, num_candidates=num_candidates
    )


def encode_request(
    items: Sequence[ScoreItem], params: ScoreParams, dtype: DType, expected_fingerprint: str = ""
) -> teacher_pb2.ScoreRequest:
    num_candidates = int(items[0].candidate_ids.shape[1]) if items else 0
    seqs = [
        teacher_pb2.ScoreSequence(
            token_ids=encode(it.token_ids, "int32"),
            response_start=it.response_start,
            candidate_ids=encode(it.candidate_ids, "int32"),
        )
        for it in items
    ]
    return teacher_pb2.ScoreRequest(
        sequences=seqs,
        top_k=params.top_k,
        num_candidates=num_candidates,
        temperature=params.temperature,
        logprob_dtype=_TO_WIRE[dtype],
        expected_tokenizer_fingerprint=expected_fingerprint,
    )


def decode_reply(reply: teacher_pb2.ScoreReply, items: Sequence[ScoreItem]) -> list[ItemScores]:
    """Decode ``reply`` into float32/int32 arrays, checking every shape against ``items``."""
    dtype = _FROM_WIRE.get(reply.logprob_dtype)
    if dtype is None or len(reply.scores) != len(items):
        raise MalformedReply(f"reply has {len(reply.scores)} sequences for {len(items)}, dtype {dtype}")
    k, c = int(reply.top_k), int(reply.num_candidates)
    try:
        return [
            _decode_one(i, s, it.num_positions, k, c, dtype)
            for i, (s, it) in enumerate(zip(reply.scores, items, strict=True))
        ]
    except TensorDecodeError as err:
        raise MalformedReply(str(err)) from err


def _decode_one(i: int, s: teacher_pb2.SequenceScores, p: int, k: int, c: int, dtype: DType) -> ItemScores:
    f = f"scores[{i}]"

    def floats(data: bytes, shape: tuple[int, ...], name: str) -> np.ndarray:
        return decode(data, dtype, shape, f"{f}.{name}").astype(np.float32)

    return ItemScores(
        token_logprobs=floats(s.token_logprobs, (p,), "token_logprobs"),
        top_ids=decode(s.top_ids, "int32", (p, k), f"{f}.top_ids").astype(np.int32),
        top_logprobs=floats(s.top_logprobs, (p, k), "top_logprobs"),
        candidate_logprobs=floats(s.candidate_logprobs, (p, c), "candidate_logprobs"),
        outside_mass=floats(s.outside_mass, (p,), "outside_mass"),
    )
