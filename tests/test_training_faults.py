"""Faults during a real training run (issue 6, RELIABILITY 1, 5, 9, 10): real redis-server,
teacher, reward service, rollout workers and learner processes on tiny offline models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contracts import keys
from learner.checkpoint import load_latest
from tests.training_stack import StreamLedger, TrainingStack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainingStack]:
    s = TrainingStack(tmp_path_factory.mktemp("faults"))
    try:
        yield s
    finally:
        s.close()


def _applied(stack: TrainingStack, run_id: str) -> list[str]:
    ckpt = load_latest(stack.tmp / "runs" / run_id / "checkpoints")
    assert ckpt is not None
    return [rid for step in ckpt.extra["applied_log"] for rid in step]


def _rids(stack: TrainingStack, stream: str) -> dict[str, bytes]:
    return {f[b"rid"].decode(): f.get(b"reason", b"") for _, f in stack.client.xrange(stream)}


def test_learner_kill_9_redis_restart_and_a_poison_entry(stack: TrainingStack) -> None:
    run_id, steps = "run-faults000001", 12
    stack.create_run(run_id, stack.spec(steps=steps, checkpoint_interval=2))
    stream = keys.rollout_stream(run_id)
    ledger = StreamLedger(stack.redis.url, stream)
    ledger.start()
    poison = {"rid": "poison", "group": "999999:1", "size": "1", "data": b"\x00\xffnot-a-rollout"}
    stack.client.xadd(stream, poison)  # type: ignore[arg-type]
    worker = stack.worker("w-a")
    learner = stack.learner(run_id, "--audit", "--max-deliveries", "2", "--lease-ttl-s", "4")
    stack.wait(lambda: stack.last_step(run_id) >= 3, 150, "step 3")
    learner.proc.kill()  # kill -9 after step 3: the last checkpoint holds step 2
    learner.stop()
    stack.redis.kill()  # redis-server dies too; AOF (appendfsync always) brings everything back
    stack.redis.start()
    learner = stack.learner(run_id, "--audit", "--max-deliveries", "2", "--lease-ttl-s", "4")
    stack.wait(lambda: stack.status(run_id) == "succeeded", 240, "run succeeded")
    assert learner.proc.wait(30) == 0
    produced = ledger.stop()

    applied = _applied(stack, run_id)
    assert len(applied) == len(set(applied)) == steps * 2 * 3, "every step applied exactly one batch, once"
    assert set(applied) <= set(produced)
    dead = _rids(stack, keys.dead_letter_stream(run_id))
    assert "poison" in dead, "the malformed entry went to the dead-letter stream"
    pending_or_new = set(_rids(stack, stream))
    lost = set(produced) - set(applied) - set(dead) - pending_or_new
    assert not lost, f"rollouts neither applied, dead-lettered nor still queued: {sorted(lost)[:5]}"
    worker.stop()  # workers serve every run: the next test's must be the only ones


def test_a_killed_worker_and_a_teacher_down_for_10_s(stack: TrainingStack) -> None:
    run_id, steps = "run-faults000002", 120
    stack.create_run(run_id, stack.spec(steps=steps))
    # One prompt per lease: both workers share every step. Enough steps that work is left when the
    # teacher goes down (the test looks every 0.2 s, and a step can take 10 ms: 24 steps were
    # sometimes all done by then), so the survivor takes over the victim's prompts and meets the
    # teacher's downtime.
    survivor = stack.worker("w-b", "--lease-ttl-s", "3", "--prompts-per-batch", "1")
    victim = stack.worker("w-c", "--lease-ttl-s", "3", "--prompts-per-batch", "1")
    learner = stack.learner(run_id, "--audit")
    stack.wait(lambda: stack.last_step(run_id) >= 2, 150, "step 2")
    victim.proc.kill()  # its leased prompt is handed to the survivor when the lease runs out
    stack.wait(lambda: stack.last_step(run_id) >= 3, 150, "step 3 after the worker died")
    # the victim's last groups can make step 3 while the survivor still starts (on a slow CPU, past
    # the teacher's downtime): it must be sampling when the teacher goes down
    stack.wait(lambda: "loaded policy version" in survivor.log(), 150, "the survivor sampling")
    stack.restart_teacher(down_s=10.0)
    stack.wait(lambda: stack.status(run_id) == "succeeded", 240, "run succeeded")
    assert learner.proc.wait(30) == 0
    assert survivor.proc.poll() is None or survivor.proc.returncode == 0
    assert "retrying" in survivor.log(), "the worker retried while the teacher was down"
    dead = _rids(stack, keys.dead_letter_stream(run_id))
    # Rollouts that waited out the teacher's downtime may be too stale to train on (reason
    # "stale", by design); none may be partial or malformed.
    malformed = {rid: reason for rid, reason in dead.items() if reason != b"stale"}
    assert not malformed, f"no partial or malformed rollout reached the stream: {malformed}"
    assert len(set(_applied(stack, run_id))) == steps * 2 * 3
