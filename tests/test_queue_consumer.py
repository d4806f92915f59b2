"""Consumer side against a real redis-server: whole groups, ack after checkpoint, replay skipping,
dead letters, staleness, claims, trimming, and a Redis restart with AOF."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from contracts import keys
from contracts.redis_server import EmbeddedRedis, make_client
from learner.applied import AppliedIds
from learner.queue import ClaimLost, ConsumerConfig, RolloutConsumer
from services.rollout.queue import F_DATA, F_GROUP, F_GROUP_SIZE, F_ROLLOUT_ID, PromptLease
from tests.redis_fixtures import embedded, produce, synthetic_group

pytestmark = pytest.mark.integration
RUN = "run-c"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with embedded(tmp_path / "redis") as s:
        yield s


@pytest.fixture
def client(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = make_client(server.url)
    yield c
    c.close()


def _consumer(client: redis.Redis, name: str = "learner", applied: AppliedIds | None = None,
              **kw: object) -> RolloutConsumer:  # fmt: skip
    base: dict[str, object] = dict(run_id=RUN, consumer=name, max_staleness=4, read_count=3, block_ms=50,
                                   claim_idle_ms=300, claim_interval_s=0.05)  # fmt: skip
    return RolloutConsumer(client, ConsumerConfig(**{**base, **kw}), applied)  # type: ignore[arg-type]


def _dead(client: redis.Redis) -> list[dict[bytes, bytes]]:
    entries: Any = client.xrange(keys.dead_letter_stream(RUN))
    return [fields for _, fields in entries]


def _pending(client: redis.Redis) -> int:
    return int(client.xpending(keys.rollout_stream(RUN), keys.LEARNER_GROUP)["pending"])


def test_batches_hold_whole_groups_and_ack_waits_for_the_checkpoint(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    produced = produce(server.url, RUN, num_groups=4, group_size=2)
    consumer = _consumer(client)  # read_count 3 splits groups across reads
    batch = consumer.next_batch(2, policy_version=0, timeout_s=5)
    assert len(batch.groups) == 2
    for g in batch.groups:
        assert [m.rollout.group_index for m in g.members] == [0, 1]
        assert len({m.rollout.prompt_id for m in g.members}) == 1
    assert [m.rollout.rollout_id for m in batch.rollouts] == produced[:4]
    consumer.mark_applied(batch)
    assert _pending(client) >= 4  # applied, but no checkpoint yet
    assert consumer.ack_applied() == 4
    rest = consumer.next_batch(2, policy_version=0, timeout_s=5)
    assert [m.rollout.rollout_id for m in rest.rollouts] == produced[4:]


def test_restart_rereads_pending_and_skips_what_the_checkpoint_applied(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    produced = produce(server.url, RUN, num_groups=3, group_size=2)
    first = _consumer(client)
    batch = first.next_batch(2, policy_version=0, timeout_s=5)
    first.mark_applied(batch)
    checkpointed = AppliedIds.from_state(first.applied.to_state())  # then "crash" before the ack
    again = _consumer(make_client(server.url), applied=checkpointed)
    nxt = again.next_batch(1, policy_version=0, timeout_s=2)
    assert [m.rollout.rollout_id for m in nxt.rollouts] == produced[4:]
    assert again.counters()["duplicates"] == 4
    again.mark_applied(nxt)
    again.ack_applied()
    assert _pending(client) == 0


def _raw_entry(client: redis.Redis, rid: str, group: str, data: bytes) -> str:
    fields = {F_ROLLOUT_ID: rid.encode(), F_GROUP: group.encode(), F_GROUP_SIZE: b"1", F_DATA: data}
    return client.xadd(keys.rollout_stream(RUN), fields).decode()  # type: ignore[arg-type,union-attr]


def test_poison_entries_are_dead_lettered_after_max_deliveries(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    consumer = _consumer(client, max_deliveries=2)
    _raw_entry(client, "bad-bytes", "100:1", b"\x08\xff\xff garbage")
    nan = synthetic_group(RUN, PromptLease(101, 1, 0), 1)[0]
    arr = np.frombuffer(nan.teachers[0].token_logprobs, "<f2").copy()
    arr[0] = np.inf
    nan.teachers[0].token_logprobs = arr.tobytes()
    _raw_entry(client, nan.rollout_id, "101:1", nan.SerializeToString())
    produced = produce(server.url, RUN, num_groups=1, group_size=2)
    batch = consumer.next_batch(1, policy_version=0, timeout_s=5)
    assert [m.rollout.rollout_id for m in batch.rollouts] == produced  # training goes on
    deadline = time.monotonic() + 30
    while len(consumer.counters()) < 3 and time.monotonic() < deadline:
        consumer.next_batch(1, policy_version=0, timeout_s=0.2)
    assert consumer.counters() == {"dead:decode": 1, "dead:nonfinite": 1, "groups_dropped": 2}
    reasons = {f[b"rid"]: (f[b"reason"], f[b"detail"]) for f in _dead(client)}
    assert reasons[b"bad-bytes"][0] == b"decode" and b"after 2 deliveries" in reasons[b"bad-bytes"][1]
    assert reasons[nan.rollout_id.encode()][0] == b"nonfinite"
    assert b"teachers[0].token_logprobs" in reasons[nan.rollout_id.encode()][1]
    consumer.mark_applied(batch)
    consumer.ack_applied()
    assert _pending(client) == 0  # poison acknowledged on the main stream


def test_stale_rollouts_are_never_trained_on(server: EmbeddedRedis, client: redis.Redis) -> None:
    old = produce(server.url, RUN, num_groups=1, group_size=2, policy_version=1)
    consumer = _consumer(client, max_staleness=2)
    batch = consumer.next_batch(1, policy_version=4, timeout_s=0.5)  # 4 - 1 > 2
    assert batch.groups == []
    assert consumer.counters() == {"dead:stale": 2, "groups_dropped": 1}
    assert {f[b"rid"].decode() for f in _dead(client)} == set(old)
    # The dropped group no longer counts against the producers' staleness budget.
    assert client.hget(keys.producer_counters(RUN), "accepted_groups") == b"0"


def test_trim_never_deletes_a_pending_entry(server: EmbeddedRedis, client: redis.Redis) -> None:
    produce(server.url, RUN, num_groups=4, group_size=2)
    consumer = _consumer(client, read_count=2, applied_horizon_ms=0)
    done = consumer.next_batch(1, policy_version=0)
    consumer.mark_applied(done)
    consumer.ack_applied()
    held = consumer.next_batch(1, policy_version=0)  # delivered, not acknowledged
    minid = consumer.trim()
    stream = keys.rollout_stream(RUN)
    entries: Any = client.xrange(stream)
    remaining = [e.decode() for e, _ in entries]
    assert minid == held.entry_ids[0] and remaining[0] == held.entry_ids[0]
    assert not set(done.entry_ids) & set(remaining)
    assert len(remaining) == 6  # the pending group and the two undelivered ones
    assert all(m.rollout.rollout_id not in consumer.applied for m in done.rollouts)  # trimmed away
    assert client.zcard(keys.producer_dedup(RUN)) == 8  # younger than the dedup horizon


def test_a_slow_consumer_refreshing_its_claim_is_not_robbed_a_silent_one_is(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    produce(server.url, RUN, num_groups=2, group_size=2)
    slow = _consumer(client, "slow", read_count=2, claim_idle_ms=1000)
    mine = slow.next_batch(1, policy_version=0)
    assert len(mine.entry_ids) == 2
    other = _consumer(make_client(server.url), "other", read_count=2, claim_idle_ms=1000)
    theirs = other.next_batch(1, policy_version=0)
    for _ in range(25):  # a long step: 2.5 s > claim_idle_ms, refreshed every 100 ms
        time.sleep(0.1)
        slow.refresh_claims()
        assert other.next_batch(1, policy_version=0, timeout_s=0).groups == []  # never robbed
    time.sleep(1.2)  # now "other" stops refreshing while "slow" looks for idle entries
    claimed = slow.next_batch(1, policy_version=0, timeout_s=10)
    assert claimed.entry_ids == theirs.entry_ids  # its own in-flight group is not handed out twice
    other.refresh_claims()  # the silent one notices it lost them and drops them
    assert other._held == set()


def test_redis_restart_keeps_stream_group_and_pending(tmp_path: Path) -> None:
    """RELIABILITY 10 with AOF appendfsync always: a SIGKILLed Redis comes back with everything."""
    server = EmbeddedRedis(tmp_path / "r", appendfsync="always").start()
    port = server.port
    produced = produce(server.url, RUN, num_groups=3, group_size=2)
    client = make_client(server.url)
    consumer = _consumer(client)
    batch = consumer.next_batch(2, policy_version=0)
    consumer.mark_applied(batch)
    consumer.ack_applied()
    held = consumer.next_batch(1, policy_version=0)
    server.kill()
    again = EmbeddedRedis(tmp_path / "r", port=port, appendfsync="always").start()
    try:
        assert client.xlen(keys.rollout_stream(RUN)) == 6  # the same client reconnects
        summary = client.xpending(keys.rollout_stream(RUN), keys.LEARNER_GROUP)
        assert summary["pending"] == 2 and summary["min"].decode() == held.entry_ids[0]
        restarted = _consumer(make_client(again.url), applied=consumer.applied)
        rest = restarted.next_batch(1, policy_version=0, timeout_s=1)
        assert [m.rollout.rollout_id for m in rest.rollouts] == produced[4:]
    finally:
        client.close()
        again.stop()


def test_an_incomplete_group_is_released_after_group_wait(server: EmbeddedRedis, client: redis.Redis) -> None:
    lone = synthetic_group(RUN, PromptLease(300, 1, 0), 2)[0]  # its sibling never arrives
    fields = {F_ROLLOUT_ID: lone.rollout_id.encode(), F_GROUP: b"300:1", F_GROUP_SIZE: b"2",
              F_DATA: lone.SerializeToString()}  # fmt: skip
    client.xadd(keys.rollout_stream(RUN), fields)  # type: ignore[arg-type]
    consumer = _consumer(client, group_wait_s=1.0)
    assert consumer.next_batch(1, policy_version=0, timeout_s=0.1).groups == []
    batch = consumer.next_batch(1, policy_version=0, timeout_s=10)
    assert [m.rollout.rollout_id for m in batch.rollouts] == [lone.rollout_id]
    assert consumer.counters()["partial_groups"] == 1


def test_applied_entries_taken_by_another_consumer_stop_the_learner(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    produce(server.url, RUN, num_groups=1, group_size=2)
    first = _consumer(client, "first")
    batch = first.next_batch(1, policy_version=0)
    first.mark_applied(batch)
    time.sleep(0.4)  # no refresh: looks dead
    thief = _consumer(make_client(server.url), "thief")
    assert thief.next_batch(1, policy_version=0, timeout_s=10).entry_ids == batch.entry_ids
    with pytest.raises(ClaimLost):
        first.refresh_claims()


def test_trim_prunes_producer_dedup_ids_past_the_horizon(server: EmbeddedRedis, client: redis.Redis) -> None:
    produce(server.url, RUN, num_groups=3, group_size=2, pause_s=0.005)  # distinct entry milliseconds
    consumer = _consumer(client, dedup_horizon_ms=0)
    batch = consumer.next_batch(2, policy_version=0)
    consumer.mark_applied(batch)
    consumer.ack_applied()
    held = consumer.next_batch(1, policy_version=0)
    time.sleep(0.01)
    consumer.trim()
    members: Any = client.zrange(keys.producer_dedup(RUN), 0, -1)
    dedup = {m.decode() for m in members}
    assert dedup == {m.rollout.rollout_id for m in held.rollouts}  # below the oldest pending: gone


def test_applied_ids_outlive_the_trim_for_the_applied_horizon(
    server: EmbeddedRedis, client: redis.Redis
) -> None:
    """An ack lost in a Redis crash (appendfsync everysec) must not lead to a second application."""
    produce(server.url, RUN, num_groups=2, group_size=2)
    consumer = _consumer(client)  # default horizon: 60 s
    batch = consumer.next_batch(1, policy_version=0)
    consumer.mark_applied(batch)
    consumer.ack_applied()
    consumer.next_batch(1, policy_version=0)
    assert consumer.trim() is not None
    assert client.xlen(keys.rollout_stream(RUN)) == 2  # the acknowledged group is trimmed...
    assert all(m.rollout.rollout_id in consumer.applied for m in batch.rollouts)  # ...its ids are kept
