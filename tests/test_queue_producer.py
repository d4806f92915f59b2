"""Producer side against a real redis-server: leases, fencing, idempotent publish, backpressure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio
import torch

from contracts import keys
from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from learner.checkpoint import publish_weights, weights_path
from services.rollout.queue import (
    InvalidGroup,
    LeaseLost,
    ProducerConfig,
    PromptLease,
    RolloutProducer,
    WeightsNotice,
    current_weights,
    weights_notices,
)
from tests.redis_fixtures import DroppingProxy, embedded, synthetic_group

pytestmark = pytest.mark.integration
RUN = "run-p"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with embedded(tmp_path / "redis") as s:
        yield s


@pytest.fixture
async def client(server: EmbeddedRedis) -> AsyncIterator[redis.asyncio.Redis]:
    c = make_async_client(server.url)
    yield c
    await c.aclose()


def _cfg(**kw: object) -> ProducerConfig:
    base: dict[str, object] = dict(run_id=RUN, group_size=2, groups_per_step=2, max_staleness=1000,
                                   dataset_size=7, poll_s=0.02)  # fmt: skip
    return ProducerConfig(**{**base, **kw})  # type: ignore[arg-type]


async def _worker(producer: RolloutProducer, taken: list[int]) -> None:
    while (lease := await producer.lease()) is not None:
        taken.append(lease.prompt_id)
        await asyncio.sleep(0)  # let the other workers interleave
        await producer.publish(lease, synthetic_group(RUN, lease, producer.config.group_size))


async def test_workers_never_take_the_same_prompt(server: EmbeddedRedis) -> None:
    clients = [make_async_client(server.url) for _ in range(4)]
    producers = [RolloutProducer(c, _cfg(total_prompts=30)) for c in clients]
    taken: list[int] = []
    await asyncio.gather(*(_worker(p, taken) for p in producers))
    assert sorted(taken) == list(range(30))
    assert await clients[0].xlen(keys.rollout_stream(RUN)) == 60
    assert await clients[0].zcard(keys.prompt_leases(RUN)) == 0
    for c in clients:
        await c.aclose()


async def test_a_dead_workers_prompt_is_taken_again_and_the_zombie_is_fenced(
    client: redis.asyncio.Redis,
) -> None:
    cfg = _cfg(lease_ttl_s=0.2, total_prompts=1)
    dead, alive = RolloutProducer(client, cfg), RolloutProducer(client, cfg)
    first = await dead.lease()
    assert first == PromptLease(0, 1, 0)
    assert await alive.try_lease() == (None, 0)  # no new prompt, but one may still expire
    await asyncio.sleep(0.3)
    second = await alive.lease()
    assert second == PromptLease(0, 2, 0)
    with pytest.raises(LeaseLost):
        await dead.renew(first)
    with pytest.raises(LeaseLost):
        await dead.publish(first, synthetic_group(RUN, first, 2))
    await alive.renew(second)
    result = await alive.publish(second, synthetic_group(RUN, second, 2))
    assert len(result.entry_ids) == 2 and not result.duplicate
    assert await alive.lease() is None
    assert await client.xlen(keys.rollout_stream(RUN)) == 2


async def test_publish_checks_the_group(client: redis.asyncio.Redis) -> None:
    producer = RolloutProducer(client, _cfg())
    lease = await producer.lease()
    assert lease is not None
    group = synthetic_group(RUN, lease, 2)
    with pytest.raises(InvalidGroup, match="records"):
        await producer.publish(lease, group[:1])
    with pytest.raises(InvalidGroup, match="group_index"):
        await producer.publish(lease, group[::-1])
    group[1].rollout_id = "forged"
    with pytest.raises(InvalidGroup, match="rollout_id"):
        await producer.publish(lease, group)
    assert await client.xlen(keys.rollout_stream(RUN)) == 0


def test_config_names_bad_fields() -> None:
    with pytest.raises(ValueError, match="group_size"):
        _cfg(group_size=0)
    with pytest.raises(ValueError, match="max_staleness"):
        _cfg(max_staleness=-1)
    with pytest.raises(ValueError, match="run_id"):
        _cfg(run_id="a:b")


async def test_publish_retried_after_a_lost_reply_adds_nothing(server: EmbeddedRedis) -> None:
    """RELIABILITY 4: the reply to the publish transaction's EXEC is lost after Redis ran it."""
    assert server.port is not None
    proxy = DroppingProxy(server.port, marker=b"*1\r\n$4\r\nEXEC\r\n")
    client = make_async_client(f"redis://127.0.0.1:{proxy.port}/0")
    producer = RolloutProducer(client, _cfg())
    try:
        lease = await producer.lease()
        assert lease is not None
        proxy.armed = True
        result = await producer.publish(lease, synthetic_group(RUN, lease, 2))
        assert proxy.dropped == 1
        assert result.duplicate  # the retry found the first attempt's ids
        assert await client.xlen(keys.rollout_stream(RUN)) == 2
        assert await client.hget(keys.producer_counters(RUN), "duplicates") == b"1"
        again = await producer.publish(lease, synthetic_group(RUN, lease, 2))  # a manual retry too
        assert again.duplicate and await client.xlen(keys.rollout_stream(RUN)) == 2
    finally:
        await client.aclose()
        proxy.close()


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_backpressure_stops_producers_at_the_staleness_bound(
    server: EmbeddedRedis, client: redis.asyncio.Redis
) -> None:
    """RELIABILITY 8/9: capacity = (max_staleness + version + 1) × groups_per_step − (accepted + running)."""
    cfg = _cfg(max_staleness=1, groups_per_step=2)
    producers = [RolloutProducer(make_async_client(server.url), cfg) for _ in range(3)]
    taken: list[int] = []
    tasks = [asyncio.create_task(_worker(p, taken)) for p in producers]
    stream = keys.rollout_stream(RUN)
    await _until(lambda: len(taken) == 4)
    await asyncio.sleep(0.3)  # room for a fifth, if the bound did not hold
    assert len(taken) == 4 and await client.xlen(stream) == 8  # (1 + 0 + 1) × 2 groups
    # the data alone: used_memory also counts the clients' buffers, which come and go with polling
    memory = (await client.info("memory"))["used_memory_dataset"]
    await asyncio.sleep(0.5)
    assert await client.xlen(stream) == 8 and not any(t.done() for t in tasks)
    assert (await client.info("memory"))["used_memory_dataset"] - memory < 64 * 1024  # plateau
    # A restarted worker does not burst: the counts live in Redis.
    assert (await RolloutProducer(client, cfg).try_lease())[0] is None
    await client.set(keys.policy_version(RUN), 1)  # the learner took a step
    await _until(lambda: len(taken) == 6)
    await asyncio.sleep(0.3)
    assert len(taken) == 6 and await client.xlen(stream) == 12
    assert await RolloutProducer(client, cfg).capacity() == 0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for p in producers:
        await p.client.aclose()


async def test_producer_rides_out_a_redis_restart(tmp_path: Path) -> None:
    """RELIABILITY 10: the same client reconnects with backoff; the AOF kept leases and counters."""
    server = EmbeddedRedis(tmp_path / "r", appendfsync="always").start()
    port = server.port
    client = make_async_client(server.url)
    producer = RolloutProducer(client, _cfg(total_prompts=3))
    try:
        lease = await producer.lease()
        assert lease is not None
        await producer.publish(lease, synthetic_group(RUN, lease, 2))
        server.kill()

        def restart() -> EmbeddedRedis:
            time.sleep(0.5)  # the producer is retrying meanwhile
            return EmbeddedRedis(tmp_path / "r", port=port, appendfsync="always").start()

        restarted = asyncio.get_running_loop().run_in_executor(None, restart)
        taken = [lease.prompt_id]
        while (lease := await producer.lease()) is not None:  # retries while Redis is down
            taken.append(lease.prompt_id)
            await producer.publish(lease, synthetic_group(RUN, lease, 2))
        server = await restarted
        assert taken == [0, 1, 2]
        assert await client.xlen(keys.rollout_stream(RUN)) == 6
    finally:
        await client.aclose()
        server.stop()


async def test_hold_keeps_a_slow_workers_lease(client: redis.asyncio.Redis) -> None:
    cfg = _cfg(lease_ttl_s=1.0, total_prompts=1)
    slow, other = RolloutProducer(client, cfg), RolloutProducer(client, cfg)
    lease = await slow.lease()
    assert lease is not None
    async with slow.hold(lease):
        await asyncio.sleep(2.5)  # 2.5 TTLs of sampling and scoring
        assert await other.try_lease() == (None, 0)  # not expired: nobody takes it
    result = await slow.publish(lease, synthetic_group(RUN, lease, 2))
    assert len(result.entry_ids) == 2


async def test_workers_see_every_new_weights_version(tmp_path: Path, server: EmbeddedRedis) -> None:
    sync = make_client(server.url)
    weights = {"w": torch.zeros(2)}
    publish_weights(tmp_path, RUN, 0, weights, sync)
    client = make_async_client(server.url)
    assert await current_weights(client, RUN) == WeightsNotice(0, str(weights_path(tmp_path, 0)))
    seen: list[int] = []

    async def watch() -> None:
        async for notice in weights_notices(client, RUN):
            seen.append(notice.version)
            if notice.version == 2:
                return

    task = asyncio.create_task(watch())
    while not seen:
        await asyncio.sleep(0.01)
    for version in (1, 2):
        await asyncio.to_thread(publish_weights, tmp_path, RUN, version, weights, sync)
    await asyncio.wait_for(task, timeout=5)
    assert seen == [0, 1, 2]
    await client.aclose()
    sync.close()


async def test_lease_many_stays_within_capacity_and_publish_many_is_per_group(
    client: redis.asyncio.Redis,
) -> None:
    cfg = _cfg(max_staleness=0, groups_per_step=3, lease_ttl_s=1.0)
    producer = RolloutProducer(client, cfg)
    leases = await producer.lease_many(5)
    assert [x.prompt_id for x in leases] == [0, 1, 2]  # capacity (0 + 0 + 1) × 3
    assert await producer.try_lease_many(5) == ([], 0)
    await asyncio.sleep(1.2)  # all three expire; another worker takes two of them back
    retaken = await RolloutProducer(client, cfg).lease_many(2)
    assert [(x.prompt_id, x.attempt) for x in retaken] == [(0, 2), (1, 2)]
    groups = [(x, synthetic_group(RUN, x, 2)) for x in leases]
    with pytest.raises(LeaseLost, match=r"\[0, 1\]"):
        await producer.publish_many(groups)
    assert await client.xlen(keys.rollout_stream(RUN)) == 2  # prompt 2's group went in
    results = await producer.publish_many([(x, synthetic_group(RUN, x, 2)) for x in retaken])
    assert [len(r.entry_ids) for r in results] == [2, 2]
    with pytest.raises(ValueError, match="n"):
        await producer.try_lease_many(0)
