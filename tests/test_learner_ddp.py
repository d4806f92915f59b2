"""Two learner ranks under torchrun (DDP, gloo on CPU) take the same step as one process does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from learner.checkpoint import load_latest
from services.rollout.queue import ProducerConfig, RolloutProducer
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.procs import ROOT
from tests.redis_fixtures import synthetic_group
from tests.training_stack import VOCAB, create_run, make_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
GROUPS, K = 4, 3


async def _produce(url: str, run_id: str) -> None:
    """The same GROUPS prompt groups for every run (seeded by prompt id), valid for the tiny vocab."""
    client = make_async_client(url)
    config = ProducerConfig(
        run_id, group_size=K, groups_per_step=GROUPS, max_staleness=5, dataset_size=100, total_prompts=GROUPS
    )
    producer = RolloutProducer(client, config)
    try:
        while (lease := await producer.lease()) is not None:
            await producer.publish(lease, synthetic_group(run_id, lease, K, tokens=10, vocab=VOCAB))
    finally:
        await client.aclose()


def _learn(url: str, runs: Path, run_id: str, ranks: int) -> None:
    args = ["-m", "learner", "--run-id", run_id, "--runs-dir", str(runs), "--device", "cpu"]
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    )
    env = {**os.environ, "REDIS_URL": url, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_ranks_take_the_same_step_as_one(tmp_path: Path) -> None:
    student = build_tiny_model(tmp_path / "student", TinySpec(vocab_size=VOCAB, hidden_size=16, seed=2))
    spec = make_spec(
        student,
        tmp_path / "data.jsonl",
        steps=1,
        checkpoint_interval=1,
        optimizer={"name": "sgd", "lr": 0.5},
        objective={"gamma": 0.5, "support": "student_top_k", "top_k": 4, "baseline": "leave_one_out"},
        sampling={"responses_per_prompt": K, "prompts_per_step": GROUPS, "max_new_tokens": 8},
    )
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        for run_id, ranks in (("run-ddp00000001", 1), ("run-ddp00000002", 2)):
            create_run(make_client(server.url), run_id, spec, {})
            asyncio.run(_produce(server.url, run_id))
            _learn(server.url, tmp_path / "runs", run_id, ranks)
    finally:
        server.stop()
    one = load_latest(tmp_path / "runs" / "run-ddp00000001" / "checkpoints")
    two = load_latest(tmp_path / "runs" / "run-ddp00000002" / "checkpoints")
    assert one is not None and two is not None and one.step == two.step == 1
    initial = safetensors.torch.load_file(str(student / "model.safetensors"))
    moved = 0.0
    for name, weight in one.model.items():
        torch.testing.assert_close(two.model[name], weight, atol=1e-6, rtol=1e-5, msg=name)
        moved += float((weight - initial[name]).abs().sum())
    assert moved > 0.0, "the step changed the weights"
