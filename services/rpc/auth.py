"""Bearer-token authentication for our gRPC servers and clients.

The token travels in the ``authorization`` metadata as ``Bearer <token>``. Health checks and
reflection stay open so that orchestrators (compose, k8s) can probe a server without secrets.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata to attach to every call of a client that holds ``token``."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Refuses every call without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization")
        if given is None:
            return _deny("missing bearer token: pass metadata 'authorization: Bearer <token>'")
        given_bytes = given.encode() if isinstance(given, str) else given
        # compare_digest keeps the comparison time independent of where the tokens differ.
        if not hmac.compare_digest(given_bytes, self._expected):
            return _deny("wrong bearer token")
        return await continuation(details)
