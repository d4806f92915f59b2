"""The whole training loop as real processes: redis-server, teacher and reward services, a rollout
worker and the learner, on tiny random models built offline (no hub)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from contracts import keys
from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_client
from contracts.runspec import RunSpec
from learner.checkpoint import load_latest
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.procs import ROOT, ServiceProcess, free_port, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUN_ID = "run-e2e000000001"
VOCAB = 64


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("e2e")
    teacher_dir = build_tiny_model(tmp / "teacher", TinySpec(vocab_size=VOCAB, hidden_size=32, seed=1))
    student_dir = build_tiny_model(tmp / "student", TinySpec(vocab_size=VOCAB, hidden_size=16, seed=2))
    words = [f"w{i}" for i in range(VOCAB - 4)]
    lines = [json.dumps({"prompt": f"{words[i]} {words[i + 1]}", "answer": words[i + 2]}) for i in range(20)]
    (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    server = EmbeddedRedis(tmp / "redis", appendfsync="always").start()
    t_port, r_port = free_port(), free_port()
    teacher = ServiceProcess(
        "services.teacher", ["--model", str(teacher_dir), "--port", str(t_port)], tmp / "t.log"
    )
    reward = ServiceProcess("services.reward", ["--port", str(r_port)], tmp / "r.log")
    try:
        wait_serving(teacher, f"127.0.0.1:{t_port}")
        wait_serving(reward, f"127.0.0.1:{r_port}")
        yield {
            "tmp": tmp, "redis": server, "teacher": f"127.0.0.1:{t_port}", "reward": f"127.0.0.1:{r_port}",
            "student": student_dir, "data": tmp / "data.jsonl",
        }  # fmt: skip
    finally:
        teacher.stop()
        reward.stop()
        server.stop()


def _spec(stack: dict, **objective: object) -> RunSpec:  # type: ignore[type-arg]
    return RunSpec.model_validate({
        "student": str(stack["student"]), "dataset": str(stack["data"]),
        "teachers": [{"name": "t0", "weight": 1.0}],
        "rewards": [{"name": "exact_match", "verifier": "exact_match",
                     "schedule": {"kind": "linear", "lambda0": 0.5, "alpha": 0.1}}],
        "objective": {"gamma": 0.5, "support": "student_top_k", "top_k": 8, "baseline": "leave_one_out",
                      **objective},
        "sampling": {"responses_per_prompt": 3, "prompts_per_step": 2, "max_new_tokens": 6},
        "optimizer": {"lr": 1e-3}, "steps": 4, "checkpoint_interval": 2, "max_staleness": 1,
    })  # fmt: skip


def test_worker_and_learner_train_a_run_to_success(stack: dict) -> None:  # type: ignore[type-arg]
    client = make_client(stack["redis"].url)
    create_run(client, RUN_ID, _spec(stack), {"t0": stack["teacher"]})
    env = {"REDIS_URL": stack["redis"].url}
    run_dir = stack["tmp"] / "runs" / RUN_ID
    worker = ServiceProcess(
        "services.rollout", ["--reward-address", stack["reward"], "--seed", "1", "--poll-s", "0.2"],
        stack["tmp"] / "w.log", env,
    )  # fmt: skip
    try:
        learner = subprocess.run(
            [sys.executable, "-m", "learner", "--run-id", RUN_ID, "--runs-dir", str(run_dir.parent),
             "--batch-timeout-s", "1"],
            cwd=ROOT, env={**__import__("os").environ, **env}, capture_output=True, text=True, timeout=100,
        )  # fmt: skip
        assert learner.returncode == 0, learner.stdout + learner.stderr + worker.log()
    finally:
        worker.stop()
    state = client.hgetall(rs.run_state_key(RUN_ID))
    assert state[b"status"] == b"succeeded"
    metrics = client.xrange(rs.run_metrics_key(RUN_ID))
    assert [int(float(f[b"step"])) for _, f in metrics] == [1, 2, 3, 4]
    for _, f in metrics:
        assert float(f[b"dense_kl"]) > 0 and float(f[b"lambda/exact_match"]) > 0
        # the waiting-for-data share, per step and for the run so far (learner.train.DataWait)
        assert float(f[b"data_wait_s"]) >= 0
        assert 0 <= float(f[b"wait_fraction"]) <= 1 and 0 <= float(f[b"wait_fraction_total"]) <= 1
    # the first step waits for the worker's first groups (sampling and scoring): it cannot be free
    assert float(metrics[0][1][b"data_wait_s"]) > 0
    ckpt = load_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.step == 4
    assert int(client.get(keys.policy_version(RUN_ID))) == 4
    # everything applied was acknowledged by the final checkpoint
    assert client.xpending(keys.rollout_stream(RUN_ID), keys.learner_group(RUN_ID))["pending"] == 0
