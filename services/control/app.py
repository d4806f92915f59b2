"""The control plane's FastAPI app factory: ``create_app(settings)``.

``lifespan`` opens the async Redis client (starting an embedded ``redis-server`` in
``settings.data_dir`` when no ``redis_url`` is given) and closes it at shutdown. The app never
imports torch (a test checks it). Run it with ``python -m services.control --dev``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from contracts.redis_server import EmbeddedRedis
from services.control import problems
from services.control.routers import health, runs, teachers, verifiers
from services.control.settings import ControlSettings, get_settings

log = logging.getLogger(__name__)
API_VERSION = "1.0.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ControlSettings = app.state.settings
    embedded: EmbeddedRedis | None = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        await asyncio.to_thread(embedded.start)
        url = embedded.url
    app.state.redis = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
    )
    log.info("control plane using Redis at %s", url)
    try:
        yield
    finally:
        await app.state.redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def create_app(settings: ControlSettings) -> FastAPI:
    """The app for ``settings``; raises ``InsecureSettings`` without a strong token outside dev mode."""
    settings.check_secure()
    app = FastAPI(
        title="distill control plane",
        version=API_VERSION,
        description="Runs, teachers, verifiers, λ schedules and metrics of on-policy distillation.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.dependency_overrides[get_settings] = lambda: settings
    problems.install(app)
    for router in (runs.router, teachers.router, verifiers.router, health.router):
        app.include_router(router)
    return app
