"""Teachers and verifiers registries in Redis (hashes of name → JSON record).

Registration probes happen in the routers (``probes.py``); this module keeps the records
consistent with the runs that use them: a teacher re-registered with another tokenizer while an
active run uses it is refused, and one in use by a queued or running run cannot be deleted.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from contracts import runstate as rs
from services.control.errors import Conflict, Invalid, NotFound
from services.control.models import TeacherPublic, VerifierPublic
from services.control.store import text, text_map, transaction

log = logging.getLogger(__name__)
_ACTIVE = (rs.RunStatus.QUEUED, rs.RunStatus.RUNNING)


class Registry:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def put_teacher(self, teacher: TeacherPublic) -> bool:
        """Store ``teacher``; True if new. Refused if an active run of it expects another tokenizer."""
        runs_key = rs.teacher_runs_key(teacher.name)

        async def body(pipe: Pipeline) -> bool:
            existing = await pipe.hexists(rs.teachers_key(), teacher.name)
            for run_id, state in await _active_runs(pipe, runs_key):
                if state.fingerprint and state.fingerprint != teacher.tokenizer_fingerprint:
                    raise Invalid(
                        f"teacher {teacher.name!r} now reports tokenizer fingerprint "
                        f"{teacher.tokenizer_fingerprint}, but run {run_id} ({state.status.value}) uses it "
                        f"with {state.fingerprint}",
                        "address",
                    )
            pipe.multi()
            pipe.hset(rs.teachers_key(), teacher.name, teacher.model_dump_json())
            return not existing

        created = await transaction(self.redis, [rs.teachers_key(), runs_key], body)
        log.info("%s teacher %s at %s", "registered" if created else "updated", teacher.name, teacher.address)
        return created

    async def get_teacher(self, name: str) -> TeacherPublic:
        raw = await self.redis.hget(rs.teachers_key(), name)
        if raw is None:
            raise NotFound(f"teacher {name!r} is not registered", "name")
        return TeacherPublic.model_validate_json(raw)

    async def list_teachers(self) -> list[TeacherPublic]:
        raw = await self.redis.hgetall(rs.teachers_key())
        return [TeacherPublic.model_validate_json(raw[n]) for n in sorted(raw)]

    async def delete_teacher(self, name: str) -> None:
        """Remove ``name``; Conflict while a queued or running run uses it."""
        runs_key = rs.teacher_runs_key(name)

        async def body(pipe: Pipeline) -> None:
            if not await pipe.hexists(rs.teachers_key(), name):
                raise NotFound(f"teacher {name!r} is not registered", "name")
            active = [run_id for run_id, _ in await _active_runs(pipe, runs_key)]
            if active:
                raise Conflict(f"teacher {name!r} is used by active runs {sorted(active)}; stop them first")
            pipe.multi()
            pipe.hdel(rs.teachers_key(), name)
            pipe.delete(runs_key)

        await transaction(self.redis, [rs.teachers_key(), runs_key], body)
        log.info("deleted teacher %s", name)

    async def put_verifier(self, verifier: VerifierPublic) -> bool:
        created = await self.redis.hset(rs.verifiers_key(), verifier.name, verifier.model_dump_json())
        return bool(created)

    async def list_verifiers(self) -> list[VerifierPublic]:
        raw = await self.redis.hgetall(rs.verifiers_key())
        return [VerifierPublic.model_validate_json(raw[n]) for n in sorted(raw)]


async def _active_runs(pipe: Pipeline, runs_key: str) -> list[tuple[str, rs.RunState]]:
    """The queued/running runs in ``runs_key``; their state keys join the WATCH (a resume races us)."""
    run_ids = sorted(text(r) for r in await pipe.smembers(runs_key))
    if not run_ids:
        return []
    state_keys = [rs.run_state_key(r) for r in run_ids]
    await pipe.watch(*state_keys)
    active = []
    for run_id, key in zip(run_ids, state_keys, strict=True):
        raw = await pipe.hgetall(key)
        if raw:
            state = rs.RunState.from_hash(text_map(raw))
            if state.status in _ACTIVE:
                active.append((run_id, state))
    return active
