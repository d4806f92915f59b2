"""``/healthz`` (the process answers), ``/readyz`` (Redis answers), ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.control import metrics
from services.control.deps import RedisDep, SettingsDep
from services.control.errors import Unavailable
from services.control.models import Health
from services.control.problems import problem_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses=problem_responses(503))
async def readyz(client: RedisDep, settings: SettingsDep) -> Health:
    """Ready when Redis answers PING within ``redis_timeout_s``; 503 problem otherwise."""
    try:
        await asyncio.wait_for(client.ping(), settings.redis_timeout_s)
    except (TimeoutError, RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable(f"Redis does not answer: {exc!r}") from exc
    return Health(status="ok")


@router.get(
    "/metrics", response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                     "description": "Prometheus exposition text"}, **problem_responses(503)},
)  # fmt: skip
async def prometheus(redis: RedisDep, settings: SettingsDep) -> Response:
    body = await metrics.render(redis, settings.metrics_max_runs)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
