"""Prometheus ``/metrics``: read at scrape time from Redis (streams, groups, the latest metrics entry).

Built into a fresh ``CollectorRegistry`` per scrape, so nothing stale survives a finished run.
Label cardinality is bounded: ``status`` (five values) and ``run_id`` for at most
``metrics_max_runs`` active (queued/running) runs — never per rollout or per prompt.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from redis.exceptions import ResponseError

from contracts import keys
from contracts import runstate as rs
from services.control.store import text

log = logging.getLogger(__name__)
ACTIVE = (rs.RunStatus.QUEUED, rs.RunStatus.RUNNING)

# gauge name -> (help, field of the latest metrics entry it mirrors)
_FROM_LATEST = {
    "distill_policy_staleness": ("Policy versions the trained rollouts lagged (latest step)", "policy_lag"),
    "distill_teacher_latency_seconds": ("Mean teacher Score latency (latest step)", "teacher_latency_s"),
    "distill_reward_timeouts": ("Verifier timeouts so far", "reward_timeouts"),
    "distill_tokens_per_second": ("Trained tokens per second (latest step)", "tokens_per_s"),
    "distill_loss": ("Objective value (latest step)", "loss"),
}


async def render(redis: aioredis.Redis, max_runs: int) -> bytes:
    """The exposition text for the platform's state now."""
    registry = CollectorRegistry()
    statuses = await _statuses(redis)
    runs = Gauge("distill_runs", "Runs by status", ["status"], registry=registry)
    for status in rs.RunStatus:
        runs.labels(status=status.value).set(sum(1 for s in statuses.values() if s is status))
    active = [run_id for run_id, s in statuses.items() if s in ACTIVE][-max_runs:]
    await _per_run(redis, registry, active)
    return generate_latest(registry)


async def _statuses(redis: aioredis.Redis) -> dict[str, rs.RunStatus]:
    """Status of every run, in creation order."""
    run_ids = [text(r) for r in await redis.zrange(rs.runs_index_key(), 0, -1)]
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.hget(rs.run_state_key(run_id), "status")
        raw = await pipe.execute()
    statuses = {}
    known = {s.value for s in rs.RunStatus}
    for run_id, status in zip(run_ids, raw, strict=True):
        if status is None:
            continue
        if text(status) not in known:
            # One corrupt run must not take the whole scrape down; GET /v1/runs/{id} reports it.
            log.warning("run %s has unknown status %r; left out of /metrics", run_id, status)
            continue
        statuses[run_id] = rs.RunStatus(text(status))
    return statuses


async def _per_run(redis: aioredis.Redis, registry: CollectorRegistry, run_ids: list[str]) -> None:
    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["run_id"], registry=registry)

    lag = gauge("distill_queue_lag", "Rollouts in the stream not yet delivered to the learner")
    pending = gauge("distill_pending", "Rollouts delivered to the learner and not yet acknowledged")
    length = gauge("distill_queue_length", "Entries in the rollout stream")
    dead = gauge("distill_dead_letters", "Rollouts dead-lettered (never trained on)")
    step = gauge("distill_run_step", "Step the learner has begun")
    latest = {name: gauge(name, doc) for name, (doc, _) in _FROM_LATEST.items()}
    for run_id, (group, queue_len, dead_len, run_step, entry) in zip(
        run_ids, await _read_runs(redis, run_ids), strict=True
    ):
        length.labels(run_id).set(queue_len)
        dead.labels(run_id).set(dead_len)
        step.labels(run_id).set(run_step)
        if group is not None:
            pending.labels(run_id).set(group.get("pending") or 0)
            if group.get("lag") is not None:  # Redis reports no lag after some deletions
                lag.labels(run_id).set(group["lag"])
        values = rs.parse_metric_fields(entry)
        for name, (_, field) in _FROM_LATEST.items():
            value = values.get(field)
            if value is not None:
                latest[name].labels(run_id).set(value)


RunReading = tuple[dict[str, Any] | None, int, int, int, dict[str, str]]


async def _read_runs(redis: aioredis.Redis, run_ids: list[str]) -> list[RunReading]:
    """Everything /metrics shows of each run, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.xlen(keys.rollout_stream(run_id))
            pipe.xlen(keys.dead_letter_stream(run_id))
            pipe.hget(rs.run_state_key(run_id), "step")
            pipe.xrevrange(rs.run_metrics_key(run_id), count=1)
            pipe.xinfo_groups(keys.rollout_stream(run_id))
        replies = await pipe.execute(raise_on_error=False)
    readings = []
    for i, run_id in enumerate(run_ids):
        queue_len, dead_len, run_step, entries, groups = replies[5 * i : 5 * i + 5]
        readings.append(
            (
                _learner_group(run_id, groups),
                int(queue_len),
                int(dead_len),
                int(run_step or 0),
                entries[0][1] if entries else {},
            )
        )
    return readings


def _learner_group(run_id: str, groups: Any) -> dict[str, Any] | None:
    if isinstance(groups, ResponseError):  # no stream yet: nothing produced for this run
        return None
    if isinstance(groups, Exception):
        raise groups
    wanted = keys.learner_group(run_id)
    return next((dict(g) for g in groups if g.get("name") == wanted), None)
