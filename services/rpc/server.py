"""Serve a gRPC service the way every service of this platform does.

Health (NOT_SERVING until ``load`` finishes, again from SIGTERM on), reflection, optional bearer
token and TLS, message limits raised above gRPC's 4 MB default, and a graceful stop that lets
in-flight calls finish within ``grace_s``. Services supply only their servicers and a loader.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.rpc.auth import TokenAuthInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port; the bound port is logged and returned by start()
    token: str | None = None  # bearer token required on every non-health call
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: Path | None = None
    grace_s: float = 10.0  # how long in-flight calls may run after SIGTERM
    max_message_bytes: int = MAX_MESSAGE_BYTES


@dataclass
class ServiceSpec:
    full_name: str  # e.g. "distill.v1.TeacherScoring"; its health status follows the loader
    add_to_server: Callable[[aio.Server], None]


def _credentials(opts: ServerOptions) -> grpc.ServerCredentials | None:
    if opts.tls_cert is None and opts.tls_key is None:
        return None
    if opts.tls_cert is None or opts.tls_key is None:
        raise ValueError("tls_cert and tls_key must be given together")
    pair = (opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())
    return grpc.ssl_server_credentials([pair])


class RunningServer:
    """A started server whose services turn SERVING once the loader has run."""

    def __init__(self, server: aio.Server, health: HealthServicer, names: list[str], port: int):
        self.server, self.health, self.names, self.port = server, health, names, port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        # Health goes NOT_SERVING first so that clients move to another replica while we drain.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start(services: list[ServiceSpec], opts: ServerOptions) -> RunningServer:
    interceptors = [TokenAuthInterceptor(opts.token)] if opts.token else []
    limits = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
    ]
    server = aio.server(interceptors=interceptors, options=limits)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for spec in services:
        spec.add_to_server(server)
    names = [s.full_name for s in services]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server)
    address = f"{opts.host}:{opts.port}"
    creds = _credentials(opts)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    running = RunningServer(server, health, names, port)
    await running.set_serving(False)
    await server.start()
    log.info("listening on %s:%d (tls=%s, auth=%s)", opts.host, port, creds is not None, bool(opts.token))
    return running


async def serve(
    services: list[ServiceSpec],
    opts: ServerOptions,
    load: Callable[[], Coroutine[Any, Any, None]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT: bind, load (NOT_SERVING meanwhile), serve, drain, stop."""
    running = await start(services, opts)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loader: asyncio.Task[None] = asyncio.create_task(load())
    waiter = asyncio.create_task(stopping.wait())
    await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done():
        loader.result()  # a failed load raises here and the process exits non-zero
        await running.set_serving(True)
        log.info("serving %s", ", ".join(running.names))
        await waiter
    else:
        loader.cancel()
    log.info("stopping: draining in-flight calls for up to %.1f s", opts.grace_s)
    await running.stop(opts.grace_s)
    if on_stop is not None:
        await on_stop()
