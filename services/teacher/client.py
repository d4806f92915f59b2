"""Async client of teacher services, used by rollout workers.

``TeacherClient`` talks to the replicas of one teacher: round-robin over them, a deadline on
every call, retries with backoff on UNAVAILABLE only (each retry goes to the next replica), and
batches split into requests under a byte budget so that no message passes gRPC's limits.
``score_all`` asks several teachers at once.

    async with TeacherClient(["10.0.0.5:50051", "10.0.0.6:50051"], deadline_s=30) as teacher:
        scores = await teacher.score([make_item(ids, response_start)], top_k=20)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from contracts.tensors import DType
from proto.distill.v1 import teacher_pb2, teacher_pb2_grpc
from services.rpc.auth import bearer_metadata
from services.rpc.client import RetryPolicy, call_with_retry, open_channel
from services.teacher.domain import IntArray, ItemScores, ScoreItem, ScoreParams, TeacherError, TeacherInfo
from services.teacher.wire import (
    FRAMING_BYTES,
    decode_reply,
    encode_request,
    info_from_wire,
    reply_bytes,
    request_bytes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024  # under gRPC's 4 MB default, so any server takes our messages


class FingerprintMismatch(TeacherError):
    """The teacher's tokenizer differs from the caller's: token ids would not mean the same."""


def _int32(values: npt.ArrayLike, field: str, ndim: int) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{field}: need a {ndim}-D integer array, got {arr.dtype} of shape {arr.shape}")
    info = np.iinfo(np.int32)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{field}: values outside the int32 range")
    return arr.astype(np.int32)


def make_item(
    token_ids: npt.ArrayLike, response_start: int, candidate_ids: npt.ArrayLike | None = None
) -> ScoreItem:
    """A ``ScoreItem`` from integer arrays (ids, and (P, C) candidates or none: a (P, 0) array).

    Only types and the int32 range are checked here; the server validates the rest against its model.
    """
    ids = _int32(token_ids, "token_ids", 1)
    positions = max(int(ids.shape[0]) - response_start, 0)
    cands = (
        np.zeros((positions, 0), np.int32)
        if candidate_ids is None
        else _int32(candidate_ids, "candidate_ids", 2)
    )
    return ScoreItem(token_ids=ids, response_start=int(response_start), candidate_ids=cands)


def split_by_bytes(
    items: Sequence[ScoreItem], top_k: int, dtype: DType, budget: int
) -> list[list[ScoreItem]]:
    """Consecutive chunks whose request and estimated reply both stay within ``budget`` bytes.

    An item over the budget on its own travels alone; the server refuses it with
    RESOURCE_EXHAUSTED only if it passes the server's (larger) message limit.
    """
    chunks: list[list[ScoreItem]] = []
    current: list[ScoreItem] = []
    req = rep = FRAMING_BYTES  # the message's own framing, counted once per chunk
    for it in items:
        c = int(it.candidate_ids.shape[1])
        r = request_bytes(it)
        p = reply_bytes([it.num_positions], top_k, c, dtype) - FRAMING_BYTES
        if current and max(req + r, rep + p) > budget:
            chunks.append(current)
            current, req, rep = [], FRAMING_BYTES, FRAMING_BYTES
        current.append(it)
        req, rep = req + r, rep + p
    if current:
        chunks.append(current)
    return chunks


class TeacherClient:
    """The replicas of one teacher (``addresses``), reached round-robin."""

    def __init__(
        self,
        addresses: Sequence[str],
        token: str | None = None,
        tls_ca: Path | None = None,
        deadline_s: float = 30.0,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if not addresses:
            raise ValueError("addresses: give at least one replica address")
        if not (math.isfinite(deadline_s) and deadline_s > 0):
            raise ValueError(f"deadline_s must be a finite number > 0, got {deadline_s}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.addresses = list(addresses)
        self._channels = [open_channel(a, tls_ca) for a in self.addresses]
        self._stubs = [teacher_pb2_grpc.TeacherScoringStub(ch) for ch in self._channels]
        self._metadata = bearer_metadata(token)
        self._turn = itertools.count()
        self.deadline_s, self.chunk_bytes = deadline_s, chunk_bytes
        self.retry = retry or RetryPolicy()

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    async def _call(self, invoke: Callable[[Any], Awaitable[T]]) -> T:
        """``invoke(stub)`` on the next replica, again on the next one after each UNAVAILABLE."""

        def attempt() -> Awaitable[T]:
            return invoke(self._stubs[next(self._turn) % len(self._stubs)])

        return await call_with_retry(attempt, self.retry)

    async def info(self) -> TeacherInfo:
        reply = await self._call(
            lambda stub: stub.Info(
                teacher_pb2.InfoRequest(), timeout=self.deadline_s, metadata=self._metadata
            )
        )
        return info_from_wire(reply)

    async def check_fingerprint(self, expected: str) -> TeacherInfo:
        """The teacher's ``Info``; raises ``FingerprintMismatch`` when its tokenizer is not ``expected``."""
        info = await self.info()
        if info.tokenizer_fingerprint != expected:
            raise FingerprintMismatch(
                f"teacher {info.model_name} at {self.addresses} has tokenizer {info.tokenizer_fingerprint}, "
                f"the caller expects {expected}"
            )
        return info

    async def score(
        self,
        items: Sequence[ScoreItem],
        top_k: int,
        temperature: float = 1.0,
        dtype: DType = "float32",
        expected_fingerprint: str = "",
    ) -> list[ItemScores]:
        """Scores of ``items`` in order; large batches go out as several concurrent requests."""
        if not items:
            raise ValueError("items: empty batch")
        if len({int(it.candidate_ids.shape[1]) for it in items}) > 1:
            raise ValueError("candidate_ids: every item needs the same number of candidates per position")
        params = ScoreParams(top_k=top_k, temperature=temperature)
        chunks = split_by_bytes(items, top_k, dtype, self.chunk_bytes)
        parts = await asyncio.gather(
            *(self._score_chunk(c, params, dtype, expected_fingerprint) for c in chunks)
        )
        return [s for part in parts for s in part]

    async def _score_chunk(
        self, items: list[ScoreItem], params: ScoreParams, dtype: DType, fingerprint: str
    ) -> list[ItemScores]:
        request = encode_request(items, params, dtype, fingerprint)
        reply = await self._call(
            lambda stub: stub.Score(request, timeout=self.deadline_s, metadata=self._metadata)
        )
        return decode_reply(reply, items)


async def score_all(
    teachers: Mapping[str, TeacherClient],
    items: Sequence[ScoreItem],
    top_k: int,
    temperature: float = 1.0,
    dtype: DType = "float32",
    fingerprints: Mapping[str, str] | None = None,
) -> dict[str, list[ItemScores]]:
    """Ask every teacher (by name) concurrently; the first failure propagates."""
    names = list(teachers)
    fps = fingerprints or {}
    results = await asyncio.gather(
        *(teachers[n].score(items, top_k, temperature, dtype, fps.get(n, "")) for n in names)
    )
    return dict(zip(names, results, strict=True))
