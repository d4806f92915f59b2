"""Async Redis access for runs: create (idempotent), read, list, stop/resume, λ schedules, metrics.

Layout and lifecycle are the contract of ``contracts/runstate.py``. Every read-modify-write runs
under ``WATCH``/``MULTI`` (``_transaction``), so concurrent commands on one run are serialized
and a change of state goes through ``contracts.runstate.transition`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from contracts import runstate as rs
from contracts.keys import InvalidRunId
from contracts.runspec import RunSpec
from contracts.schedules import Schedule, ScheduleError, ScheduleTimeline
from services.control.errors import Conflict, Invalid, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_TRANSACTION_RETRIES = 64
LIST_CHUNK = 100


@dataclass(frozen=True)
class RunRecord:
    """One run as stored: id, spec, state, λ timelines."""

    id: str
    spec: RunSpec
    state: rs.RunState
    timelines: dict[str, ScheduleTimeline]


def text(value: object) -> str:
    """A Redis reply as str (the clients decode responses; bytes only if one was built otherwise)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_map(value: Mapping[Any, Any] | None) -> dict[str, str]:
    return {text(k): text(v) for k, v in (value or {}).items()}


def new_run_id() -> str:
    return "run-" + secrets.token_hex(6)


def spec_digest(spec: RunSpec) -> str:
    """Digest of the validated spec: two bodies that mean the same run have the same digest."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


async def transaction(redis: aioredis.Redis, watch: list[str], body: Callable[[Pipeline], Awaitable[T]]) -> T:
    """Run ``body`` under WATCH on ``watch``, retrying when another client changed a watched key.

    ``body`` reads through the pipeline (immediate mode), then calls ``pipe.multi()`` and queues
    its writes; a domain error raised by ``body`` aborts with nothing written.
    """
    for _ in range(MAX_TRANSACTION_RETRIES):
        async with redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*watch)
                result = await body(pipe)
                await pipe.execute()
                return result
            except WatchError:
                continue
    raise Conflict("too many concurrent changes to the same resource; retry")


def _check_id(run_id: str) -> str:
    try:
        rs.run_state_key(run_id)
    except InvalidRunId:
        raise NotFound(f"run {run_id!r} does not exist", field="run_id") from None
    return run_id


class RunStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def create(self, spec: RunSpec, idempotency: str | None) -> tuple[str, bool]:
        """(run id, created?); a repeated ``idempotency`` key with the same spec returns the first run."""
        digest, run_id, now = spec_digest(spec), new_run_id(), time.time()
        names = [t.name for t in spec.teachers]
        idem_key = rs.idempotency_key(idempotency) if idempotency is not None else None
        watch = [rs.teachers_key()] + ([idem_key] if idem_key else [])

        async def body(pipe: Pipeline) -> tuple[str, bool]:
            if idem_key is not None:
                previous = await pipe.get(idem_key)
                if previous is not None:
                    return _replay(text(previous), digest)
            fingerprint = await _check_teachers(pipe, spec, names)
            state = rs.RunState(
                status=rs.RunStatus.QUEUED, desired=rs.Desired.RUN, step=0, created_at=now,
                updated_at=now, name=spec.name or "", fingerprint=fingerprint,
            )  # fmt: skip
            pipe.multi()
            pipe.set(rs.run_spec_key(run_id), spec.model_dump_json())
            pipe.hset(rs.run_state_key(run_id), mapping=state.to_hash())  # type: ignore[arg-type]
            timelines = {r.name: json.dumps(ScheduleTimeline(r.schedule).to_dict()) for r in spec.rewards}
            if timelines:
                pipe.hset(rs.run_schedules_key(run_id), mapping=timelines)  # type: ignore[arg-type]
            pipe.zadd(rs.runs_index_key(), {run_id: int(now * 1000)})
            for name in names:
                pipe.sadd(rs.teacher_runs_key(name), run_id)
            if idem_key is not None:
                record = json.dumps({"body_sha256": digest, "run_id": run_id})
                pipe.set(idem_key, record, ex=rs.IDEMPOTENCY_TTL_S)
            return run_id, True

        result = await transaction(self.redis, watch, body)
        if result[1]:
            log.info("created run %s", result[0])
        return result

    async def get(self, run_id: str) -> RunRecord:
        _check_id(run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(rs.run_spec_key(run_id))
            pipe.hgetall(rs.run_state_key(run_id))
            pipe.hgetall(rs.run_schedules_key(run_id))
            spec_json, state, schedules = await pipe.execute()
        if spec_json is None or not state:
            raise NotFound(f"run {run_id!r} does not exist", field="run_id")
        timelines = {n: ScheduleTimeline.from_dict(json.loads(v)) for n, v in schedules.items()}
        spec = RunSpec.model_validate_json(spec_json)
        return RunRecord(run_id, spec, rs.RunState.from_hash(state), timelines)

    async def list_runs(
        self, status: rs.RunStatus | None, limit: int, cursor: int
    ) -> tuple[list[tuple[str, rs.RunState]], int | None]:
        """Runs in creation order from index position ``cursor``, and the next cursor (None at the end)."""
        found: list[tuple[str, rs.RunState]] = []
        position = cursor
        while len(found) < limit:
            ids = [
                text(i)
                for i in await self.redis.zrange(rs.runs_index_key(), position, position + LIST_CHUNK - 1)
            ]
            if not ids:
                return found, None
            async with self.redis.pipeline(transaction=False) as pipe:
                for run_id in ids:
                    pipe.hgetall(rs.run_state_key(run_id))
                states = await pipe.execute()
            for run_id, raw in zip(ids, states, strict=True):
                position += 1
                if raw:
                    state = rs.RunState.from_hash(text_map(raw))
                    if status is None or state.status is status:
                        found.append((run_id, state))
                        if len(found) == limit:
                            break
        more = await self.redis.zcard(rs.runs_index_key()) > position
        return found, position if more else None

    async def command(self, run_id: str, command: rs.Command) -> rs.RunState:
        """Apply a stop/resume (or learner) command through ``transition``, atomically."""
        key = rs.run_state_key(_check_id(run_id))

        async def body(pipe: Pipeline) -> rs.RunState:
            raw = await pipe.hgetall(key)
            if not raw:
                raise NotFound(f"run {run_id!r} does not exist", field="run_id")
            state = rs.RunState.from_hash(text_map(raw))
            try:
                status, desired = rs.transition(state.status, state.desired, command)
            except rs.InvalidTransition as exc:
                raise Conflict(str(exc), field="status") from exc
            if command is rs.Command.RESUME and status is not state.status:
                await _check_teachers_unchanged(pipe, run_id, state)
            new = state.model_copy(update={"status": status, "desired": desired, "updated_at": time.time()})
            pipe.multi()
            pipe.hset(key, mapping=new.to_hash())  # type: ignore[arg-type]
            return new

        return await transaction(self.redis, [key, rs.teachers_key()], body)

    async def set_schedules(
        self, run_id: str, schedules: dict[str, Schedule]
    ) -> tuple[int, dict[str, ScheduleTimeline]]:
        """Append the schedules from the next step on; (that step, the updated timelines)."""
        record = await self.get(run_id)
        for name in schedules:
            if name not in record.timelines:
                known = sorted(record.timelines) or "none"
                detail = f"run {run_id} has no reward {name!r}; its rewards: {known}"
                raise Invalid(detail, f"schedules.{name}")
        state_key, sched_key = rs.run_state_key(run_id), rs.run_schedules_key(run_id)

        async def body(pipe: Pipeline) -> tuple[int, dict[str, ScheduleTimeline]]:
            state = rs.RunState.from_hash(text_map(await pipe.hgetall(state_key)))
            if state.status is rs.RunStatus.SUCCEEDED:
                raise Conflict(f"run {run_id} has succeeded; its schedule can no longer change", "status")
            raw = text_map(await pipe.hgetall(sched_key))
            timelines = {n: ScheduleTimeline.from_dict(json.loads(v)) for n, v in raw.items()}
            step_from = state.step + 1
            for name, schedule in schedules.items():
                try:
                    timelines[name].set(step_from, schedule)
                except ScheduleError as exc:
                    raise Invalid(str(exc), f"schedules.{name}") from exc
            pipe.multi()
            changed = {n: json.dumps(timelines[n].to_dict()) for n in schedules}
            pipe.hset(sched_key, mapping=changed)  # type: ignore[arg-type]
            pipe.hset(state_key, "updated_at", str(time.time()))
            return step_from, timelines

        return await transaction(self.redis, [state_key, sched_key], body)

    async def metrics(self, run_id: str, since: str | None, limit: int) -> list[tuple[str, dict[str, str]]]:
        """Up to ``limit`` metrics entries after stream id ``since`` (exclusive), oldest first."""
        await self.get(run_id)
        start = f"({since}" if since is not None else "-"
        entries = await self.redis.xrange(rs.run_metrics_key(run_id), min=start, max="+", count=limit)
        return [(text(entry_id), text_map(fields)) for entry_id, fields in entries or []]

    async def latest_metrics(self, run_id: str) -> tuple[str, dict[str, str]] | None:
        entries = await self.redis.xrevrange(rs.run_metrics_key(run_id), count=1)
        return (text(entries[0][0]), text_map(entries[0][1])) if entries else None


def _replay(previous: str, digest: str) -> tuple[str, bool]:
    record: dict[str, Any] = json.loads(previous)
    if record["body_sha256"] != digest:
        raise Conflict("Idempotency-Key was already used with a different run spec", field="Idempotency-Key")
    return str(record["run_id"]), False


async def _check_teachers(pipe: Pipeline, spec: RunSpec, names: list[str]) -> str:
    """The tokenizer fingerprint all the run's teachers share; Invalid naming the first that differs."""
    raw = await pipe.hmget(rs.teachers_key(), names) if names else []
    expected = spec.student_fingerprint
    for i, (name, record) in enumerate(zip(names, raw, strict=True)):
        if record is None:
            raise Invalid(f"teacher {name!r} is not registered (POST /v1/teachers)", f"teachers[{i}].name")
        fingerprint = json.loads(record)["tokenizer_fingerprint"]
        if expected is not None and fingerprint != expected:
            source = "student_fingerprint" if spec.student_fingerprint else f"teachers[0] ({names[0]})"
            raise Invalid(
                f"teacher {name!r} has tokenizer fingerprint {fingerprint}, which differs from {source}: "
                f"{expected}",
                f"teachers[{i}].name",
            )
        expected = fingerprint
    return expected or ""


async def _check_teachers_unchanged(pipe: Pipeline, run_id: str, state: rs.RunState) -> None:
    """A run coming back must find its teachers registered with the tokenizer it started with
    (a stopped run does not pin its teachers: they may have been deleted or re-registered)."""
    spec = RunSpec.model_validate_json(text(await pipe.get(rs.run_spec_key(run_id))))
    names = [t.name for t in spec.teachers]
    raw = await pipe.hmget(rs.teachers_key(), names) if names else []
    for i, (name, record) in enumerate(zip(names, raw, strict=True)):
        if record is None:
            raise Conflict(f"teacher {name!r} of run {run_id} is no longer registered", f"teachers[{i}].name")
        fingerprint = json.loads(record)["tokenizer_fingerprint"]
        if state.fingerprint and fingerprint != state.fingerprint:
            raise Conflict(
                f"teacher {name!r} now has tokenizer fingerprint {fingerprint}; run {run_id} "
                f"started with {state.fingerprint}",
                f"teachers[{i}].name",
            )
