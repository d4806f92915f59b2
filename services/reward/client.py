"""Async client of the reward service, for the rollout worker.

    async with RewardClient("127.0.0.1:50061", token=...) as rewards:
        infos = await rewards.info()
        results = await rewards.verify([Item(prompt, response, {"answer": "42"}, ("math",))])

Every call carries a deadline; UNAVAILABLE is retried with jittered backoff a bounded number of
times (the server was restarting or draining); every other error is raised at once.
INVALID_ARGUMENT comes back as ``InvalidRequestError`` with the server's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc import aio

from proto.distill.v1 import reward_pb2 as pb
from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.domain import Item, Reward, VerifierInfo
from services.reward.errors import InvalidRequestError
from services.reward.wire import info_from_pb, item_to_pb, reply_from_pb
from services.rpc.auth import bearer_metadata
from services.rpc.client import RetryPolicy, call_with_retry, open_channel

DEADLINE_SLACK_S = 1.0  # the call deadline exceeds the item budget by this, so TIMEOUTs come back


class RewardClient:
    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: Path | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.timeout_s = timeout_s  # default per-item budget; the call's deadline is this plus slack
        self.retry = retry or RetryPolicy()
        self._channel = open_channel(address, tls_ca)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._metadata = bearer_metadata(token)

    async def info(self) -> list[VerifierInfo]:
        async def call() -> pb.RewardInfoReply:
            reply: pb.RewardInfoReply = await self._stub.Info(
                pb.RewardInfoRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
            return reply

        return info_from_pb(await call_with_retry(call, self.retry))

    async def verify(self, items: Sequence[Item], timeout_s: float | None = None) -> list[list[Reward]]:
        """Rewards per item; each item gets at most ``timeout_s`` (default: the client's)."""
        budget = self.timeout_s if timeout_s is None else timeout_s
        request = pb.VerifyRequest(items=[item_to_pb(i) for i in items], timeout_s=budget)

        async def call() -> pb.VerifyReply:
            reply: pb.VerifyReply = await self._stub.Verify(
                request, timeout=budget + DEADLINE_SLACK_S, metadata=self._metadata
            )
            return reply

        try:
            return reply_from_pb(await call_with_retry(call, self.retry))
        except aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(err.details() or "invalid request") from err
            raise

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
