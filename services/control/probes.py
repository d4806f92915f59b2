"""Checks the control plane makes before it registers something: a teacher's gRPC ``Info`` and health,
a remote verifier's reachability. Each call has a deadline; a failure is an ``Invalid`` naming the field.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import httpx
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.distill.v1 import reward_pb2, reward_pb2_grpc, teacher_pb2, teacher_pb2_grpc
from services.control.errors import Invalid
from services.rpc.auth import bearer_metadata
from services.rpc.client import open_channel

log = logging.getLogger(__name__)
TEACHER_SERVICE = teacher_pb2.DESCRIPTOR.services_by_name["TeacherScoring"].full_name


@dataclass(frozen=True)
class TeacherInfo:
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sequence_length: int
    backend: str


async def teacher_info(address: str, timeout_s: float, token: str | None) -> TeacherInfo:
    """The teacher's ``Info`` after its health says SERVING; ``Invalid(field="address")`` otherwise."""
    async with open_channel(address) as channel:
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=TEACHER_SERVICE), timeout=timeout_s
            )
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
                raise Invalid(f"teacher at {address} is not serving (health {state})", "address")
            reply = await teacher_pb2_grpc.TeacherScoringStub(channel).Info(
                teacher_pb2.InfoRequest(), timeout=timeout_s, metadata=bearer_metadata(token)
            )
        except aio.AioRpcError as err:
            raise Invalid(_rpc_reason("teacher", address, err), "address") from err
    if not reply.tokenizer_fingerprint:
        raise Invalid(f"teacher at {address} reports no tokenizer fingerprint", "address")
    return TeacherInfo(
        model_name=reply.model_name,
        vocab_size=reply.vocab_size,
        tokenizer_fingerprint=reply.tokenizer_fingerprint,
        max_sequence_length=reply.max_sequence_length,
        backend=reply.backend,
    )


async def grpc_reachable(address: str, timeout_s: float) -> None:
    """Wait until a channel to ``address`` connects; ``Invalid(field="address")`` after ``timeout_s``."""
    async with open_channel(address) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError as err:
            detail = f"grpc verifier at {address} is unreachable within {timeout_s} s"
            raise Invalid(detail, "address") from err


async def http_reachable(url: str, timeout_s: float) -> None:
    """Any HTTP answer (even 404/405) proves the server is there; a transport error is ``Invalid``."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            await client.head(url)
        except httpx.InvalidURL as err:
            raise Invalid(f"http verifier url {url!r} is not a valid URL: {err}", "url") from err
        except httpx.TransportError as err:
            raise Invalid(f"http verifier at {url} is unreachable: {err!r}", "url") from err


async def builtin_verifier(name: str, reward_address: str, timeout_s: float, token: str | None) -> None:
    """``Invalid(field="name")`` unless the reward service at ``reward_address`` serves verifier ``name``."""
    async with open_channel(reward_address) as channel:
        try:
            reply = await reward_pb2_grpc.RewardServiceStub(channel).Info(
                reward_pb2.RewardInfoRequest(), timeout=timeout_s, metadata=bearer_metadata(token)
            )
        except aio.AioRpcError as err:
            raise Invalid(_rpc_reason("reward service", reward_address, err), "name") from err
    served = sorted(v.name for v in reply.verifiers)
    if name not in served:
        raise Invalid(f"the reward service serves no verifier {name!r}; it serves {served}", "name")


def _rpc_reason(what: str, address: str, err: aio.AioRpcError) -> str:
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{what} at {address} is unreachable ({code.name}): {err.details()}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return f"{what} at {address} refused our token (set DISTILL_TEACHER_TOKEN): {err.details()}"
    return f"{what} at {address} failed {code.name}: {err.details()}"
