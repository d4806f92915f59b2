"""``Annotated`` dependency aliases used by the routers (one place, as in full-stack-fastapi-template)."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from services.control.auth import require_token
from services.control.registry import Registry
from services.control.settings import ControlSettings, get_settings
from services.control.store import RunStore


def get_redis(request: Request) -> aioredis.Redis:
    redis: aioredis.Redis = request.app.state.redis
    return redis


def get_run_store(redis: Annotated[aioredis.Redis, Depends(get_redis)]) -> RunStore:
    return RunStore(redis)


def get_registry(redis: Annotated[aioredis.Redis, Depends(get_redis)]) -> Registry:
    return Registry(redis)


SettingsDep = Annotated[ControlSettings, Depends(get_settings)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
RunStoreDep = Annotated[RunStore, Depends(get_run_store)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
# Router-level: every route of a mutating router carries it (see app.py and the auth walk test).
Authorized = Depends(require_token)
