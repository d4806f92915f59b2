"""Exactly-once application under kill -9, SIGSTOP and a Redis restart, with real processes.

A real redis-server (AOF, appendfsync always), rollouts published by the real producer, and the
learner harness (``tests/queue_harness.py``, which uses ``learner.queue`` and ``learner.checkpoint``
unchanged) killed at named points and restarted. The producer ledger must equal the ledger in
the learner's final checkpoint: no gap, no duplicate (RELIABILITY 1, 2, 3, 5, 6, 10, 12).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts import keys
from contracts.redis_server import EmbeddedRedis, make_client
from learner.checkpoint import latest_checkpoint_dir, load_latest
from tests.procs import ServiceProcess
from tests.redis_fixtures import embedded, produce

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RUN = "run-f"
GROUPS, K = 12, 2  # 24 rollouts, 2 groups per step: 6 steps


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with embedded(tmp_path / "redis") as s:
        yield s


def _harness(server_url: str, run_dir: Path, log: Path, *, crash: str = "", consumer: str = "learner",
             expect: int = GROUPS * K, **opts: object) -> ServiceProcess:  # fmt: skip
    args = ["--redis-url", server_url, "--run-id", RUN, "--run-dir", str(run_dir), "--consumer", consumer,
            "--expect", str(expect)]  # fmt: skip
    for name, value in opts.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return ServiceProcess("tests.queue_harness", args, log, env={"HARNESS_CRASH": crash})


def _wait(proc: ServiceProcess, timeout: float = 60.0) -> int:
    proc.proc.wait(timeout)
    code = proc.stop()
    return code


def _ledger(run_dir: Path) -> list[str]:
    state = load_latest(run_dir / "checkpoints")
    assert state is not None
    return list(state.extra["ledger"])


def _assert_exactly_once(produced: list[str], applied: list[str]) -> None:
    dupes = [i for i, n in Counter(applied).items() if n > 1]
    assert not dupes, f"applied twice: {dupes}"
    assert sorted(applied) == sorted(produced), f"missing: {set(produced) - set(applied)}"


def _pending(client: redis.Redis) -> int:
    return int(client.xpending(keys.rollout_stream(RUN), keys.LEARNER_GROUP)["pending"])


# Each run crashes at the next point; the step numbers are those of the 6-step run.
CRASHES = [("mid_batch:2", 1), ("after_step:3", 2), ("mid_checkpoint:4", 3), ("after_checkpoint:5", 5)]


def test_kill_9_at_every_crash_point_applies_every_rollout_once(
    server: EmbeddedRedis, tmp_path: Path
) -> None:
    produced = produce(server.url, RUN, num_groups=GROUPS, group_size=K)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    client = make_client(server.url)
    for crash, durable_step in CRASHES:
        proc = _harness(server.url, run_dir, tmp_path / f"{crash}.log", crash=crash)
        assert _wait(proc) == -signal.SIGKILL, proc.log()
        latest = latest_checkpoint_dir(ckpts)
        assert latest is not None and latest.name == f"step-{durable_step:08d}", crash
        if crash.startswith("mid_checkpoint"):
            assert list(ckpts.glob(".tmp-step-00000004-*")), "the half-written checkpoint should be there"
        assert _pending(client) > 0  # delivered, unacknowledged entries are left behind
    last = _harness(server.url, run_dir, tmp_path / "last.log")
    assert _wait(last) == 0, last.log()
    _assert_exactly_once(produced, _ledger(run_dir))
    assert _pending(client) == 0
    raw: Any = client.hgetall(keys.learner_counters(RUN))
    counters = {k.decode(): int(v) for k, v in raw.items()}
    # Only the after-checkpoint crash leaves applied-but-unacknowledged entries to skip: one step's.
    assert counters == {"duplicates": 2 * K}
    assert not list(ckpts.glob(".tmp-*"))
    assert client.xlen(keys.rollout_stream(RUN)) <= 2 * K  # trimmed, never below pending
    client.close()


def test_a_frozen_learners_entries_are_claimed_by_its_successor(
    server: EmbeddedRedis, tmp_path: Path
) -> None:
    produced = produce(server.url, RUN, num_groups=GROUPS, group_size=K)
    client = make_client(server.url)
    client.xgroup_create(keys.rollout_stream(RUN), keys.LEARNER_GROUP, id="0")
    frozen = _harness(server.url, tmp_path / "a", tmp_path / "a.log", consumer="a", step_sleep=60)
    deadline = time.monotonic() + 30
    while _pending(client) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    frozen.signal(signal.SIGSTOP)
    try:
        successor = _harness(server.url, tmp_path / "b", tmp_path / "b.log", consumer="b", claim_idle_ms=500)
        assert _wait(successor) == 0, successor.log()
        assert "claimed" in successor.log()
        _assert_exactly_once(produced, _ledger(tmp_path / "b"))
        assert _pending(client) == 0
    finally:
        frozen.signal(signal.SIGKILL)
        frozen.stop()
        client.close()


def test_redis_restart_and_a_malformed_entry_mid_run(tmp_path: Path) -> None:
    """RELIABILITY 10 and 5 with real processes: Redis SIGKILLed and restarted (AOF always) while the
    learner runs, and a malformed entry among the rollouts is dead-lettered while training goes on."""
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    port = server.port
    produced = produce(server.url, RUN, num_groups=GROUPS, group_size=K)
    client = make_client(server.url)
    poison = {b"rid": b"poison", b"group": b"poison:1", b"size": b"1", b"data": b"\x0a\xff not a rollout"}
    client.xadd(keys.rollout_stream(RUN), poison)  # type: ignore[arg-type]
    client.close()
    run_dir = tmp_path / "run"
    learner = _harness(server.url, run_dir, tmp_path / "l.log", step_sleep=0.5, claim_idle_ms=300,
                       expect=GROUPS * K + 1)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while latest_checkpoint_dir(run_dir / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert learner.proc.poll() is None, "the learner should still be running"
        server.kill()
        time.sleep(1.0)  # the learner is retrying with backoff meanwhile
        server = EmbeddedRedis(tmp_path / "redis", port=port, appendfsync="always").start()
        assert _wait(learner) == 0, learner.log()
        _assert_exactly_once(produced, _ledger(run_dir))
        client = make_client(server.url)
        dead: Any = client.xrange(keys.dead_letter_stream(RUN))
        assert [(f[b"rid"], f[b"reason"]) for _, f in dead] == [(b"poison", b"decode")]
        assert _pending(client) == 0
        client.close()
    finally:
        learner.stop()
        server.stop()
