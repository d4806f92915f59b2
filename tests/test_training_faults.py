"""Faults during a real training run (issue 6, RELIABILITY 1, 5, 9, 10): real redis-server,
teacher, reward service, rollout workers and learner processes on tiny offline models."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contracts import keys
from contracts import runstate as rs
from learner.checkpoint import load_latest
from tests.procs import ServiceProcess
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
    survivor.stop()  # workers serve every run: the next test's must be the only ones


def _retrying_against_a_dead_teacher(stack: TrainingStack, run_id: str, steps: int,
                                     name: str) -> tuple[ServiceProcess, ServiceProcess]:  # fmt: skip
    """A run past step 2 whose teacher was then killed: its worker (one) retrying the scoring, and
    its learner."""
    stack.create_run(run_id, stack.spec(steps=steps))
    worker = stack.worker(name, "--lease-ttl-s", "3")
    learner = stack.learner(run_id, "--audit")
    stack.wait(lambda: stack.last_step(run_id) >= 2, 150, "step 2")
    stack.kill_teacher()
    log = worker.log
    stack.wait(lambda: "prompts: " in log() and "retrying in" in log(), 60, "the worker retrying its scoring")
    return worker, learner


def test_a_worker_stopped_while_its_teacher_is_down_leaves_and_its_prompts_go_to_another(
    stack: TrainingStack,
) -> None:
    """SIGTERM reaches a worker retrying its scoring against a teacher that is down: it exits at
    once, publishing nothing, and the prompts it held go to the next worker when their leases lapse."""
    run_id, steps = "run-faults000003", 30
    first, learner = _retrying_against_a_dead_teacher(stack, run_id, steps, "w-d")
    started = time.monotonic()
    assert first.stop(timeout=15) == 0
    assert time.monotonic() - started < 10, "SIGTERM waited for the teacher"
    assert "stopping without them" in first.log()
    stack.teacher = stack.start_teacher()
    second = stack.worker("w-e", "--lease-ttl-s", "3")
    stack.wait(lambda: stack.status(run_id) == "succeeded", 240, "run succeeded")
    assert learner.proc.wait(30) == 0
    assert len(set(_applied(stack, run_id))) == steps * 2 * 3
    second.stop()


def test_a_worker_retrying_against_a_teacher_that_is_down_gives_up_the_groups_of_a_run_that_ended(
    stack: TrainingStack,
) -> None:
    """The run fails (its learner died) while the teacher is down: the worker drops the groups it
    was retrying and goes back to waiting for runs, instead of retrying for a run that is over."""
    run_id = "run-faults000004"
    worker, learner = _retrying_against_a_dead_teacher(stack, run_id, 30, "w-f")
    learner.proc.kill()
    learner.stop()
    stack.client.hset(rs.run_state_key(run_id), "status", "failed")
    stack.wait(lambda: "stopping without them" in worker.log(), 10, "the worker giving up the run's groups")
    assert worker.proc.poll() is None, "the worker serves the next run"
    stack.teacher = stack.start_teacher()
    worker.stop()
