"""``/v1/runs``: create (idempotent), list, get, metrics series, λ schedule changes, stop/resume."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from contracts.runspec import RunSpec
from contracts.runstate import Command, RunState, RunStatus, parse_metric_fields
from services.control.deps import Authorized, RunStoreDep
from services.control.models import (
    MetricsPoint,
    MetricsSeries,
    RunCreated,
    RunList,
    RunPublic,
    RunSummary,
    ScheduleChange,
    ScheduleUpdate,
)
from services.control.problems import problem_responses
from services.control.store import RunRecord

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=problem_responses(400, 404, 422, 503))
MUTATING = problem_responses(401, 409)
StreamId = Annotated[str, Query(pattern=r"^[0-9]{1,20}(-[0-9]{1,20})?$", description="stream entry id")]


@router.post(
    "", status_code=status.HTTP_201_CREATED, dependencies=[Authorized],
    responses={**MUTATING, 200: {"model": RunCreated, "description": "Replayed (same Idempotency-Key)"}},
)  # fmt: skip
async def create_run(
    spec: RunSpec,
    store: RunStoreDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> RunCreated:
    """Queue a run; the same ``Idempotency-Key`` with the same spec returns the same run (200)."""
    run_id, created = await store.create(spec, idempotency_key)
    response.headers["Location"] = f"/v1/runs/{run_id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    state = (await store.get(run_id)).state
    return RunCreated(id=run_id, status=state.status)


@router.get("")
async def list_runs(
    store: RunStoreDep,
    status: RunStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[int, Query(ge=0, le=2**53)] = 0,
) -> RunList:
    """Runs in creation order, optionally of one status; pass ``next_cursor`` back for the next page."""
    found, next_cursor = await store.list_runs(status, limit, cursor)
    return RunList(
        runs=[_summary(run_id, state) for run_id, state in found],
        next_cursor=str(next_cursor) if next_cursor is not None else None,
    )


@router.get("/{run_id}")
async def get_run(run_id: str, store: RunStoreDep) -> RunPublic:
    """Spec, status, step, λ per reward at the current step, latest metrics."""
    record = await store.get(run_id)
    latest = await store.latest_metrics(run_id)
    return _public(record, _point(*latest) if latest else None)


@router.get("/{run_id}/metrics")
async def get_metrics(
    run_id: str,
    store: RunStoreDep,
    since: StreamId | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricsSeries:
    """The learner's per-step metrics after entry ``since`` (exclusive), oldest first."""
    entries = await store.metrics(run_id, since, limit)
    points = [_point(entry_id, fields) for entry_id, fields in entries]
    return MetricsSeries(run_id=run_id, points=points, next=points[-1].id if len(points) == limit else None)


@router.put("/{run_id}/schedule", dependencies=[Authorized], responses=MUTATING)
async def put_schedule(run_id: str, update: ScheduleUpdate, store: RunStoreDep) -> ScheduleChange:
    """New λ schedules for named rewards, in effect from the next step on and recorded with it."""
    step_from, timelines = await store.set_schedules(run_id, dict(update.schedules))
    return ScheduleChange(
        run_id=run_id, step_from=step_from, schedules={n: t.to_dict() for n, t in timelines.items()}
    )


@router.post("/{run_id}/stop", dependencies=[Authorized], responses=MUTATING)
async def stop_run(run_id: str, store: RunStoreDep) -> RunSummary:
    """Ask the run to stop: a queued run stops now, a running one at its next step boundary."""
    return _summary(run_id, await store.command(run_id, Command.STOP))


@router.post("/{run_id}/resume", dependencies=[Authorized], responses=MUTATING)
async def resume_run(run_id: str, store: RunStoreDep) -> RunSummary:
    """Resume a stopped (or failed) run from its last checkpoint, or cancel a pending stop."""
    return _summary(run_id, await store.command(run_id, Command.RESUME))


def _summary(run_id: str, state: RunState) -> RunSummary:
    return RunSummary(
        id=run_id, name=state.name, status=state.status, desired=state.desired, step=state.step,
        created_at=state.created_at, updated_at=state.updated_at, started_at=state.started_at,
    )  # fmt: skip


def _point(entry_id: str, fields: dict[str, str]) -> MetricsPoint:
    values = parse_metric_fields(fields)
    step = values.get("step")
    return MetricsPoint(id=entry_id, step=int(step) if step is not None else None, values=values)


def _public(record: RunRecord, latest: MetricsPoint | None) -> RunPublic:
    state = record.state
    return RunPublic(
        **_summary(record.id, state).model_dump(),
        spec=record.spec,
        error=state.error,
        tokenizer_fingerprint=state.fingerprint,
        lambdas={name: t.at(state.step) for name, t in record.timelines.items()},
        schedules={name: t.to_dict() for name, t in record.timelines.items()},
        latest_metrics=latest,
    )
