"""A real training stack for tests: redis-server (AOF, appendfsync always), a teacher service and the
reward service on loopback, tiny offline models, and helpers to start workers and learners as
processes and to create runs the way the control plane does (contracts.runstate)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import redis

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_client
from contracts.runspec import RunSpec
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.procs import ServiceProcess, free_port, wait_serving

VOCAB = 64


def make_spec(student: Path, dataset: Path, **overrides: Any) -> RunSpec:
    """A small hybrid run: one teacher ``t0``, an exact-match reward on a linear λ schedule."""
    base: dict[str, Any] = {
        "student": str(student), "dataset": str(dataset),
        "teachers": [{"name": "t0", "weight": 1.0}],
        "rewards": [{"name": "exact_match", "verifier": "exact_match",
                     "schedule": {"kind": "linear", "lambda0": 0.5, "alpha": 0.1}}],
        "objective": {"gamma": 0.5, "support": "student_top_k", "top_k": 8, "baseline": "leave_one_out"},
        "sampling": {"responses_per_prompt": 3, "prompts_per_step": 2, "max_new_tokens": 6},
        "optimizer": {"lr": 1e-3}, "steps": 4, "checkpoint_interval": 2, "max_staleness": 1,
    }  # fmt: skip
    return RunSpec.model_validate(base | overrides)


def create_run(client: redis.Redis, run_id: str, spec: RunSpec, teachers: dict[str, str]) -> None:
    """What POST /v1/teachers and POST /v1/runs leave in Redis (contracts.runstate)."""
    for name, address in teachers.items():
        client.hset(rs.teachers_key(), name, json.dumps({"name": name, "address": address}))
    now = time.time()
    state = rs.RunState(
        status=rs.RunStatus.QUEUED, desired=rs.Desired.RUN, step=0, created_at=now, updated_at=now
    )
    client.set(rs.run_spec_key(run_id), spec.model_dump_json())
    client.hset(rs.run_state_key(run_id), mapping=state.to_hash())  # type: ignore[arg-type]
    client.zadd(rs.runs_index_key(), {run_id: now * 1000})


class TrainingStack:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.teacher_dir = build_tiny_model(
            tmp / "teacher", TinySpec(vocab_size=VOCAB, hidden_size=32, seed=1)
        )
        self.student_dir = build_tiny_model(
            tmp / "student", TinySpec(vocab_size=VOCAB, hidden_size=16, seed=2)
        )
        words = [f"w{i}" for i in range(VOCAB - 4)]
        rows = [{"prompt": f"{words[i]} {words[i + 1]}", "answer": words[i + 2]} for i in range(40)]
        self.dataset = tmp / "data.jsonl"
        self.dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.redis = EmbeddedRedis(tmp / "redis", appendfsync="always").start()
        self.client = make_client(self.redis.url)
        self.teacher_port, reward_port = free_port(), free_port()
        self.teacher = self.start_teacher()
        self.reward_address = f"127.0.0.1:{reward_port}"
        self.reward = ServiceProcess("services.reward", ["--port", str(reward_port)], tmp / "reward.log")
        wait_serving(self.reward, self.reward_address)
        self.procs: list[ServiceProcess] = [self.reward]

    @property
    def teacher_address(self) -> str:
        return f"127.0.0.1:{self.teacher_port}"

    def start_teacher(self) -> ServiceProcess:
        args = ["--model", str(self.teacher_dir), "--port", str(self.teacher_port)]
        proc = ServiceProcess("services.teacher", args, self.tmp / f"teacher-{time.monotonic_ns()}.log")
        wait_serving(proc, self.teacher_address)
        return proc

    def kill_teacher(self) -> None:
        self.teacher.proc.kill()
        self.teacher.stop()

    def restart_teacher(self, down_s: float) -> None:
        self.kill_teacher()
        time.sleep(down_s)
        self.teacher = self.start_teacher()

    def spec(self, **overrides: Any) -> RunSpec:
        return make_spec(self.student_dir, self.dataset, **overrides)

    def create_run(self, run_id: str, spec: RunSpec) -> None:
        create_run(self.client, run_id, spec, {"t0": self.teacher_address})

    def _env(self) -> dict[str, str]:
        return {"REDIS_URL": self.redis.url}

    def worker(self, name: str, *extra: str) -> ServiceProcess:
        args = ["--reward-address", self.reward_address, "--worker-id", name, "--poll-s", "0.2", *extra]
        proc = ServiceProcess("services.rollout", args, self.tmp / f"{name}.log", self._env())
        self.procs.append(proc)
        return proc

    def learner(self, run_id: str, *extra: str) -> ServiceProcess:
        args = ["--run-id", run_id, "--runs-dir", str(self.tmp / "runs"), "--batch-timeout-s", "1", *extra]
        proc = ServiceProcess("learner", args, self.tmp / f"learner-{time.monotonic_ns()}.log", self._env())
        self.procs.append(proc)
        return proc

    def status(self, run_id: str) -> str:
        raw: Any = self.client.hget(rs.run_state_key(run_id), "status")
        return raw.decode() if raw else ""

    def last_step(self, run_id: str) -> int:
        entries: Any = self.client.xrevrange(rs.run_metrics_key(run_id), count=1)
        return int(float(entries[0][1][b"step"])) if entries else 0

    def wait(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in self.procs)
        raise TimeoutError(f"{what} not reached after {timeout_s} s\n{logs}")

    def close(self) -> None:
        for proc in [*self.procs, self.teacher]:
            proc.stop()
        self.client.close()
        self.redis.stop()


class StreamLedger(threading.Thread):
    """Every rollout id ever appended to a run's stream, read with plain XREAD (no consumer group)
    in a thread, so that it sees each entry before the learner acknowledges and trims it."""

    def __init__(self, url: str, stream: str) -> None:
        super().__init__(daemon=True)
        self.client, self.stream = make_client(url), stream
        self.ids: list[str] = []
        self._last = "0-0"
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            reply: Any = self.client.xread({self.stream: self._last}, count=1000, block=100)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._last = entry_id
                    self.ids.append(fields.get(b"rid", b"").decode())

    def stop(self) -> list[str]:
        self._stop_event.set()
        self.join()
        self.client.close()
        return self.ids
