"""Domain types of teacher scoring, shared by the server, the backends and the client (numpy only).

Shapes: L = sequence length, P = L - response_start response positions, K = top_k,
C = candidates per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]


class TeacherError(Exception):
    """Base of the teacher domain errors; the gRPC edge maps each to a status code."""


class InvalidRequest(TeacherError):
    """A request field is malformed (→ INVALID_ARGUMENT); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unsupported(TeacherError):
    """A well-formed request this teacher cannot serve (→ FAILED_PRECONDITION)."""


class TooLarge(TeacherError):
    """A message that cannot fit under the size limit even alone (→ RESOURCE_EXHAUSTED)."""


class NotReady(TeacherError):
    """The model is not loaded yet or is shutting down (→ UNAVAILABLE)."""


@dataclass(frozen=True)
class ScoreItem:
    token_ids: IntArray  # (L,) prompt then response
    response_start: int  # first response index, 1 <= response_start < L
    candidate_ids: IntArray  # (P, C), C may be 0

    @property
    def num_positions(self) -> int:
        return int(self.token_ids.shape[0]) - self.response_start


@dataclass(frozen=True)
class ScoreParams:
    top_k: int  # teacher top-K ids to return per position
    temperature: float = 1.0  # log-probs of softmax(logits / temperature)


@dataclass
class ItemScores:
    token_logprobs: FloatArray  # (P,) teacher log-prob of the actual token
    top_ids: IntArray  # (P, K) teacher's most likely ids, best first
    top_logprobs: FloatArray  # (P, K)
    candidate_logprobs: FloatArray  # (P, C)
    outside_mass: FloatArray  # (P,) probability mass outside the top-K


@dataclass(frozen=True)
class TeacherInfo:
    model_name: str
    vocab_size: int  # ids must lie in [0, vocab_size)
    tokenizer_fingerprint: str
    max_sequence_length: int
    backend: str  # "hf" or "vllm"
    candidate_scoring: bool  # can score arbitrary candidate ids
    temperature_scaling: bool  # honours temperature != 1
    max_top_k: int
    max_batch_tokens: int
