"""Client-side gRPC helpers: channels with our limits, auth and TLS; bounded retries on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc import aio

from services.rpc.server import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def open_channel(address: str, tls_ca: Path | None = None) -> aio.Channel:
    """An asyncio channel to ``address`` (host:port) with the platform's message limits."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        return aio.secure_channel(address, creds, options=options)
    return aio.insecure_channel(address, options=options)


@dataclass
class RetryPolicy:
    attempts: int = 4  # total tries, the first included
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before try ``attempt`` (1-based retries)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, cap)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    retryable: frozenset[grpc.StatusCode] = RETRYABLE,
    on_retry: Callable[[int, aio.AioRpcError], None] | None = None,
) -> T:
    """Run ``call``; retry only on ``retryable`` codes, at most ``policy.attempts`` tries in all."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except aio.AioRpcError as err:
            if err.code() not in retryable or attempt == policy.attempts:
                raise
            if on_retry is not None:
                on_retry(attempt, err)
            log.warning("retrying after %s (try %d of %d)", err.code().name, attempt, policy.attempts)
            await asyncio.sleep(policy.backoff(attempt))
    raise AssertionError("unreachable: the loop returns or raises")
