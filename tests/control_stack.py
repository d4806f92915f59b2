"""Helpers for the control-plane tests: a real redis-server and a real uvicorn process on loopback,
and a stand-in for the learner that advances a run's state and metrics the way the contract says.

Each test module starts its own stack (``ControlStack``) on free ports; never the machine's Redis.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import redis

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis
from contracts.schedules import ScheduleTimeline
from tests.procs import ServiceProcess, free_port

TOKEN = "test-token-0123456789abcdef"


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


class FakeLearner:
    """Does to Redis what the learner will: transitions through ``transition``, steps, metrics."""

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.redis, self.run_id = client, run_id
        self.key = rs.run_state_key(run_id)

    def command(self, command: rs.Command) -> rs.RunState:
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.key)
                    state = rs.RunState.from_hash(pipe.hgetall(self.key))  # type: ignore[arg-type]
                    status, desired = rs.transition(state.status, state.desired, command)
                    new = state.model_copy(update={"status": status, "desired": desired})
                    pipe.multi()
                    pipe.hset(self.key, mapping=new.to_hash())  # type: ignore[arg-type]
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def begin_step(self, step: int) -> dict[str, float]:
        """Advance ``step`` and read the λ timelines in one MULTI (the contract); λ per reward."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key, "step", str(step))
            pipe.hgetall(rs.run_schedules_key(self.run_id))
            _, raw = pipe.execute()
        return {n: ScheduleTimeline.from_dict(json.loads(v)).at(step) for n, v in raw.items()}

    def write_metrics(
        self, step: int, kl: float, rewards: Mapping[str, float], lambdas: Mapping[str, float]
    ) -> str:
        fields: dict[str, str] = {
            "step": str(step), "loss": str(kl - sum(rewards.values())), "dense_kl": str(kl),
            "sparse": "0.0", "gamma": "0.0", "tokens_per_s": "1000", "queue_len": "3",
            "policy_lag": "1", "dead_letters": "0", "teacher_latency_s": "0.02", "reward_timeouts": "0",
        }  # fmt: skip
        fields.update({f"reward/{n}": str(v) for n, v in rewards.items()})
        fields.update({f"lambda/{n}": str(v) for n, v in lambdas.items()})
        return str(self.redis.xadd(rs.run_metrics_key(self.run_id), fields))  # type: ignore[arg-type]


def run_ids(client: redis.Redis) -> set[str]:
    """Every run id in the runs index."""
    return {str(r) for r in client.zrange(rs.runs_index_key(), 0, -1)}
