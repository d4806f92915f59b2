"""A rollout worker that starts while its teacher is down waits for it (RELIABILITY: a teacher
stopped for a while makes workers retry, not die), until the run ends or the worker is stopped.

A real redis-server; the teacher's registered address has nothing listening (a free port), as when
the teacher process is being restarted. Run: ``.venv/bin/pytest tests/test_rollout_worker_start.py -q``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_async_client
from services.rollout.worker import RolloutWorker, WorkerConfig
from tests.redis_fixtures import embedded

RUN = "run-start000001"


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with embedded(tmp_path / "redis") as server:
        yield server


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def _waiting_worker(url: str) -> tuple[RolloutWorker, asyncio.Event, asyncio.Task[object]]:
    client = make_async_client(url)
    await client.hset(rs.teachers_key(), "t0", json.dumps({"name": "t0", "address": _dead_address()}))
    await client.hset(rs.run_state_key(RUN), mapping={"status": "running"})
    worker = RolloutWorker(WorkerConfig(run_id=RUN, worker_id="w0", retry_backoff_s=0.05), client)
    stop = asyncio.Event()
    task = asyncio.create_task(worker._teacher("t0", "fingerprint", stop))
    await asyncio.sleep(1.5)  # several rounds of the client's own retries and the worker's waits
    assert not task.done(), "the worker gave up on a teacher that is only down"
    return worker, stop, task


def test_worker_waits_for_a_teacher_that_is_down_until_stopped(redis_server: EmbeddedRedis) -> None:
    async def go() -> None:
        worker, stop, task = await _waiting_worker(redis_server.url)
        stop.set()
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as err:
            await task
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 10
        await worker.client.aclose()

    asyncio.run(go())


def test_worker_stops_waiting_when_the_run_ends(redis_server: EmbeddedRedis) -> None:
    async def go() -> None:
        worker, _, task = await _waiting_worker(redis_server.url)
        await worker.client.hset(rs.run_state_key(RUN), "status", "succeeded")
        with pytest.raises(aio.AioRpcError):
            await asyncio.wait_for(task, 10)
        await worker.client.aclose()

    asyncio.run(go())
