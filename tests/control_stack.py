"""Helpers for the control-plane tests: a real redis-server and a real uvicorn process on loopback,
and a driver of a run's state that uses the learner's own state code (no training).

Each test module starts its own stack (``ControlStack``) on free ports; never the machine's Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis
from learner import run_state
from tests.procs import ServiceProcess, free_port

TOKEN = "test-token-0123456789abcdef"


def stack_fixture() -> Any:
    """A module-scoped ``stack`` fixture: ``stack = stack_fixture()`` in a test module."""

    @pytest.fixture(scope="module")
    def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlStack]:
        s = ControlStack(tmp_path_factory.mktemp("control"))
        try:
            yield s
        finally:
            s.close()

    return stack


class ControlStack:
    """``redis-server`` + ``python -m services.control`` with a strong token (not dev mode)."""

    def __init__(self, work: Path, env: Mapping[str, str] | None = None, *args: str) -> None:
        self.redis_server = EmbeddedRedis(work / "redis", appendonly=False).start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            "--port",
            str(self.port),
            "--redis-url",
            self.redis_server.url,
            "--log-level",
            "warning",
            *args,
        ]
        full_env = {"DISTILL_API_TOKEN": TOKEN, "DISTILL_RPC_TIMEOUT_S": "2", **(env or {})}
        self.proc = ServiceProcess("services.control", cmd, work / "control.log", env=full_env)
        self.redis = redis.Redis.from_url(self.redis_server.url, decode_responses=True)
        self.http = httpx.Client(base_url=self.url, timeout=30.0)
        self.auth = {"Authorization": f"Bearer {TOKEN}"}
        wait_http(self.proc, self.url + "/healthz")

    def close(self) -> int:
        self.http.close()
        self.redis.close()
        code = self.proc.stop()
        self.redis_server.stop()
        return code


def wait_http(proc: ServiceProcess, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"control plane exited with {proc.proc.returncode}:\n{proc.log()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} not answering after {timeout} s:\n{proc.log()}")


class LearnerStateDriver:
    """Moves a run through the states the learner puts it in, with the learner's own state code
    (``learner.run_state``), but without training: the control plane's tests reach every state."""

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.redis, self.run_id = client, run_id

    def command(self, command: rs.Command) -> rs.RunState:
        return run_state.apply(self.redis, self.run_id, command)

    def begin_step(self, step: int) -> dict[str, float]:
        """Advance ``step`` and read the λ timelines as the learner does; λ per reward."""
        _, timelines = run_state.begin_step(self.redis, self.run_id, step, {})
        return {name: t.at(step) for name, t in timelines.items()}

    def write_metrics(
        self, step: int, kl: float, rewards: Mapping[str, float], lambdas: Mapping[str, float]
    ) -> None:
        values = {
            "step": step, "loss": kl - sum(rewards.values()), "dense_kl": kl, "sparse": 0.0, "gamma": 0.0,
            "tokens_per_s": 1000.0, "queue_len": 3.0, "policy_lag": 1.0, "dead_letters": 0.0,
            "teacher_latency_s": 0.02, "reward_timeouts": 0.0,
        }  # fmt: skip
        values |= {f"{rs.REWARD_PREFIX}{n}": v for n, v in rewards.items()}
        values |= {f"{rs.LAMBDA_PREFIX}{n}": v for n, v in lambdas.items()}
        run_state.write_metrics(self.redis, self.run_id, values)


def run_ids(client: redis.Redis) -> set[str]:
    """Every run id in the runs index."""
    return {str(r) for r in client.zrange(rs.runs_index_key(), 0, -1)}
