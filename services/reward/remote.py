"""Adapters for a user's remote verifier: over HTTP (POST JSON) and over gRPC (this same proto).

HTTP schema — request ``POST <url>`` with JSON
``{"verifier": name, "prompt": str, "response": str, "reference": {str: str}}``; reply 200 with
``{"rewards": {"<reward name>": number, ...}, "detail": "optional text"}`` carrying every reward
name the verifier was configured with. 5xx, 429, connection errors and per-attempt timeouts are
transient: retried up to ``attempts`` tries in all with jittered backoff, then the rewards are
UNAVAILABLE. Any other 4xx or a malformed body is an ERROR at once (no retry). gRPC: the same
with UNAVAILABLE as the transient code. At most ``max_concurrency`` requests are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc import aio

from proto.distill.v1 import reward_pb2 as pb
from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.domain import Item, Outcome, Status, VerifierInfo
from services.reward.errors import RemoteUnavailableError, VerifierFailure, VerifierTimeout
from services.reward.verifiers.base import Verifier
from services.reward.wire import item_to_pb, reward_from_pb
from services.rpc.auth import bearer_metadata
from services.rpc.client import open_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemotePolicy:
    attempt_timeout_s: float = 10.0  # limit of one request
    attempts: int = 3  # tries in all, the first included
    backoff_s: float = 0.2  # first retry waits up to this (full jitter), doubling each time
    max_concurrency: int = 8  # requests in flight to this endpoint


class _Transient(Exception):
    """A failure worth retrying (5xx, UNAVAILABLE, connection refused, attempt timeout)."""


async def with_retries(attempt: Callable[[], Awaitable[Outcome]], policy: RemotePolicy, what: str) -> Outcome:
    """Run ``attempt`` until it succeeds, raises a non-transient error, or tries run out."""
    last = ""
    for n in range(1, policy.attempts + 1):
        try:
            return await attempt()
        except _Transient as err:
            last = str(err)
            log.warning("%s: transient failure (try %d of %d): %s", what, n, policy.attempts, last)
        if n < policy.attempts:
            await asyncio.sleep(random.uniform(0, policy.backoff_s * 2 ** (n - 1)))
    raise RemoteUnavailableError(f"{what} unavailable after {policy.attempts} tries: {last}")


class HttpVerifier(Verifier):
    def __init__(
        self, info: VerifierInfo, timeout_s: float, url: str, policy: RemotePolicy, token: str | None = None
    ) -> None:
        super().__init__(info, timeout_s)
        self.url, self.policy = url, policy
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=policy.max_concurrency)
        self._http = httpx.AsyncClient(timeout=policy.attempt_timeout_s, headers=headers, limits=limits)
        self._slots = asyncio.Semaphore(policy.max_concurrency)

    async def verify(self, item: Item) -> Outcome:
        body = {
            "verifier": self.name,
            "prompt": item.prompt,
            "response": item.response,
            "reference": dict(item.reference),
        }
        return await with_retries(lambda: self._attempt(body), self.policy, f"http verifier {self.name!r}")

    async def _attempt(self, body: dict[str, Any]) -> Outcome:
        async with self._slots:
            try:
                reply = await self._http.post(self.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                raise _Transient(f"{type(err).__name__}: {err}") from err
        if reply.status_code >= 500 or reply.status_code == 429:
            raise _Transient(f"HTTP {reply.status_code}")
        if reply.status_code != 200:
            raise VerifierFailure(f"remote refused the item: HTTP {reply.status_code}: {reply.text[:200]}")
        return self._parse(reply)

    def _parse(self, reply: httpx.Response) -> Outcome:
        try:
            data = reply.json()
            rewards = data["rewards"]
            values = {n: float(rewards[n]) for n in self.info.reward_names}
        except (ValueError, KeyError, TypeError) as err:
            raise VerifierFailure(f"malformed reply from {self.url}: {type(err).__name__}: {err}") from err
        return Outcome(values, str(data.get("detail", ""))[:300])

    async def close(self) -> None:
        await self._http.aclose()


class GrpcVerifier(Verifier):
    """Forwards each item to verifier ``remote_name`` of another RewardService."""

    def __init__(
        self,
        info: VerifierInfo,
        timeout_s: float,
        address: str,
        remote_name: str,
        policy: RemotePolicy,
        token: str | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        super().__init__(info, timeout_s)
        self.remote_name, self.policy, self.address = remote_name, policy, address
        self._channel = open_channel(address, tls_ca)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._metadata = bearer_metadata(token)
        self._slots = asyncio.Semaphore(policy.max_concurrency)

    async def verify(self, item: Item) -> Outcome:
        remote = Item(item.prompt, item.response, item.reference, (self.remote_name,))
        request = pb.VerifyRequest(items=[item_to_pb(remote)], timeout_s=self.policy.attempt_timeout_s)
        what = f"grpc verifier {self.name!r} at {self.address}"
        return await with_retries(lambda: self._attempt(request), self.policy, what)

    async def _attempt(self, request: pb.VerifyRequest) -> Outcome:
        async with self._slots:
            try:
                reply = await self._stub.Verify(
                    request, timeout=self.policy.attempt_timeout_s, metadata=self._metadata
                )
            except aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    raise _Transient(f"UNAVAILABLE: {err.details()}") from err
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise VerifierTimeout(
                        f"remote deadline exceeded after {self.policy.attempt_timeout_s} s"
                    ) from err
                raise VerifierFailure(f"remote refused the item: {err.code().name}: {err.details()}") from err
        return self._parse(reply)

    def _parse(self, reply: pb.VerifyReply) -> Outcome:
        if len(reply.results) != 1:
            raise VerifierFailure(f"remote returned {len(reply.results)} results for 1 item")
        rewards = {r.name: reward_from_pb(r) for r in reply.results[0].rewards}
        missing = [n for n in self.info.reward_names if n not in rewards]
        if missing:
            raise VerifierFailure(f"remote returned no value for {missing}")
        for n in self.info.reward_names:
            r = rewards[n]
            if r.status is Status.TIMEOUT:
                raise VerifierTimeout(f"remote: {r.detail}")
            if r.status is Status.UNAVAILABLE:
                raise RemoteUnavailableError(f"remote: {r.detail}")
            if r.status is not Status.OK:
                raise VerifierFailure(f"remote: {r.detail}")
        return Outcome(
            {n: rewards[n].value for n in self.info.reward_names}, rewards[self.info.reward_names[0]].detail
        )

    async def close(self) -> None:
        await self._channel.close()
