"""The whole training loop as real processes: redis-server, teacher and reward services, a rollout
worker (service mode) and the learner, on tiny random models built offline (no hub)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts import keys
from contracts import runstate as rs
from learner.checkpoint import load_latest
from tests.training_stack import TrainingStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUN_ID = "run-e2e000000001"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    s = TrainingStack(tmp_path_factory.mktemp("e2e"))
    try:
        yield s
    finally:
        s.close()


def test_worker_and_learner_train_a_run_to_success(stack: TrainingStack) -> None:
    client = stack.client
    stack.create_run(RUN_ID, stack.spec())
    run_dir = stack.tmp / "runs" / RUN_ID
    stack.worker("w0", "--seed", "1")
    learner = stack.learner(RUN_ID)
    assert learner.proc.wait(100) == 0, learner.log()

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
    # the workers' teacher calls, reported by the learner as a mean latency per step
    assert max(float(f[b"teacher_latency_s"]) for _, f in metrics) > 0
    ckpt = load_latest(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.step == 4
    assert int(client.get(keys.policy_version(RUN_ID))) == 4
    # everything applied was acknowledged by the final checkpoint
    assert client.xpending(keys.rollout_stream(RUN_ID), keys.learner_group(RUN_ID))["pending"] == 0
