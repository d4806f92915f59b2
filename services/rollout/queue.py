"""Producer side of the rollout queue: prompt leases, backpressure, idempotent publication.

A rollout worker loops ``lease = await producer.lease()`` → sample the K responses, score them
(inside ``async with producer.hold(lease)``, which renews the lease) →
``await producer.publish(lease, records)``; ``lease_many``/``publish_many`` do the same for a batch
of prompts. Workers learn of new weights through ``weights_notices``. Each step is atomic in Redis:

- **lease** (Lua): a prompt whose lease expired (its worker died) is handed out again first, with a new
  attempt number (a fencing token); otherwise the next prompt sequence number, but only while
  AReaL's capacity is positive (RELIABILITY 8/9):
  ``capacity = (max_staleness + version + 1) × groups_per_step − (accepted + running)``, counted
  in prompt groups, where *running* is the number of leased prompts, so a dead worker leaks
  nothing. With no capacity the worker waits: nothing is dropped and the stream is never trimmed.
- **renew** (Lua): extends a lease that the caller still holds.
- **publish**: XADDs the K records of one prompt group as consecutive entries in one MULTI, all
  or nothing, only while the prompt's fence key still holds the caller's attempt (WATCH). Every
  rollout id goes into a dedup sorted set in the same transaction, so a publish retried after a
  dropped connection finds its ids and reports a duplicate instead of adding copies
  (RELIABILITY 4). The learner trims that set together with the stream (``learner.queue``).

Producer-side dedup was chosen over learner-side dedup alone because a duplicate that never enters
the stream cannot be applied twice even after the learner pruned its applied ids; the learner
still skips any id it has applied (defence in depth).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from contracts import keys
from contracts.rollout_record import rollout_id
from proto.distill.v1 import rollout_pb2

logger = logging.getLogger(__name__)

# Stream entry fields. The group fields are outside the protobuf so the learner can group, count
# and dead-letter an entry whose payload does not decode.
F_ROLLOUT_ID = b"rid"
F_GROUP = b"group"
F_GROUP_SIZE = b"size"
F_DATA = b"data"

_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: leases, cursor, version, producer counters
# ARGV: ttl_ms, max_staleness, groups_per_step, total_prompts (-1: unlimited), how many (>= 1),
#       fence key prefix (the per-prompt fence keys are built in the script, which a single Redis
#       allows; a cluster would need them declared in KEYS)
# -> {1, prompt, attempt, prompt, attempt, ...} | {0, capacity} (wait) | {-1, running} (no prompts left)
LEASE_LUA = (
    _NOW_MS
    + """
local ttl, want = tonumber(ARGV[1]), tonumber(ARGV[5])
local out = {1}
local function grant(p)
  local a = redis.call('INCR', ARGV[6] .. p)
  redis.call('ZADD', KEYS[1], now + ttl, p)
  out[#out + 1] = tonumber(p)
  out[#out + 1] = a
end
-- A dead worker's prompts first: they are counted as running already.
for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, want)) do grant(p) end
local running = redis.call('ZCARD', KEYS[1])
local total = tonumber(ARGV[4])
local cursor = tonumber(redis.call('GET', KEYS[2]) or '0')
local version = tonumber(redis.call('GET', KEYS[3]) or '0')
local accepted = tonumber(redis.call('HGET', KEYS[4], 'accepted_groups') or '0')
local capacity = (tonumber(ARGV[2]) + version + 1) * tonumber(ARGV[3]) - (accepted + running)
local room = math.min(want - (#out - 1) / 2, capacity)
if total >= 0 then room = math.min(room, total - cursor) end
for _ = 1, room do grant(redis.call('INCR', KEYS[2]) - 1) end
if #out > 1 then return out end
if total >= 0 and cursor >= total then return {-1, running} end
return {0, capacity}
"""
)

# KEYS: leases, fence   ARGV: prompt, attempt, ttl_ms   -> 1 held and extended | 0 lost
RENEW_LUA = (
    _NOW_MS
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# Queued in the publisher's MULTI right after the group's XADDs (see RolloutProducer.publish).
# KEYS: leases, fence, dedup, producer counters   ARGV: prompt, rollout ids...
FINISH_LUA = (
    _NOW_MS
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[3], now, ARGV[i]) end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[4], 'accepted_groups', 1)
return 1
"""
)


_PUBLISH_TRIES = 5


class LeaseLost(RuntimeError):
    """The lease expired and another worker took the prompt: this worker's results are discarded."""


class InvalidGroup(ValueError):
    """Records that are not exactly one whole group of the leased prompt; ``field`` names the problem."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ProducerConfig:
    run_id: str
    group_size: int  # K responses per prompt
    groups_per_step: int  # prompt groups the learner consumes per optimizer step
    max_staleness: int  # how many policy versions a rollout may lag behind the learner
    dataset_size: int  # lines in the run's JSONL dataset; prompt p is line p % dataset_size
    total_prompts: int | None = None  # prompts to hand out in all (None: until stopped)
    lease_ttl_s: float = 120.0  # a worker that does not publish or renew within this is presumed dead
    poll_s: float = 0.2  # how often a waiting worker asks again

    def __post_init__(self) -> None:
        keys.check_run_id(self.run_id)
        for name in ("group_size", "groups_per_step", "dataset_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {self.max_staleness}")
        if self.total_prompts is not None and self.total_prompts < 0:
            raise ValueError(f"total_prompts: must be >= 0, got {self.total_prompts}")
        if self.lease_ttl_s <= 0 or self.poll_s <= 0:
            raise ValueError("lease_ttl_s and poll_s: must be > 0")


@dataclass(frozen=True)
class PromptLease:
    prompt_id: int  # sequence number in the run; shared by the K responses
    attempt: int  # fencing token: goes up each time the prompt is leased
    dataset_index: int  # line of the dataset to sample from


@dataclass(frozen=True)
class PublishResult:
    entry_ids: list[str]  # stream ids of the group's entries (empty for a deduplicated retry)
    duplicate: bool  # True when an earlier call had already added this group


class RolloutProducer:
    """Leases prompts and appends whole prompt groups to the run's rollout stream."""

    def __init__(self, client: redis.asyncio.Redis, config: ProducerConfig) -> None:
        self.client = client
        self.config = config
        run = config.run_id
        self._lease_keys = [
            keys.prompt_leases(run), keys.prompt_cursor(run), keys.policy_version(run),
            keys.producer_counters(run),
        ]  # fmt: skip
        self._stream = keys.rollout_stream(run)
        self._dedup = keys.producer_dedup(run)
        self._lease = client.register_script(LEASE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._finish = client.register_script(FINISH_LUA)

    @property
    def _ttl_ms(self) -> int:
        return int(self.config.lease_ttl_s * 1000)

    async def try_lease_many(self, n: int) -> tuple[list[PromptLease], int]:
        """One attempt at up to ``n`` prompts: ``(leases, 0)``, ``([], capacity<=0)`` to wait, or
        ``([], 1)`` when the run has no prompts left."""
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        cfg = self.config
        total = -1 if cfg.total_prompts is None else cfg.total_prompts
        reply = await self._lease(
            keys=self._lease_keys,
            args=[self._ttl_ms, cfg.max_staleness, cfg.groups_per_step, total, n,
                  keys.prompt_fence_prefix(cfg.run_id)],
        )  # fmt: skip
        status = int(reply[0])
        if status == 1:
            pairs = [(int(reply[i]), int(reply[i + 1])) for i in range(1, len(reply), 2)]
            return [PromptLease(p, a, p % cfg.dataset_size) for p, a in pairs], 0
        if status == 0:
            return [], int(reply[1])
        # No new prompts; leased ones may still expire and need a taker.
        return [], 1 if int(reply[1]) == 0 else 0

    async def try_lease(self) -> tuple[PromptLease | None, int]:
        """:meth:`try_lease_many` for one prompt."""
        leases, state = await self.try_lease_many(1)
        return (leases[0] if leases else None), state

    async def lease_many(self, n: int) -> list[PromptLease]:
        """Between 1 and ``n`` prompts (a worker samples a batch of prompts at once), waiting while
        the learner lags; ``[]`` when the run has no more."""
        waited = False
        while True:
            leases, state = await self.try_lease_many(n)
            if leases:
                if waited:
                    logger.info("capacity again, leased %d prompts", len(leases))
                return leases
            if state > 0:
                return []
            if not waited:
                logger.info("backpressure: learner lags, waiting (capacity %d)", state)
                waited = True
            await asyncio.sleep(self.config.poll_s)

    async def lease(self) -> PromptLease | None:
        """The next prompt to work on, waiting while the learner lags; None when the run has no more."""
        leases = await self.lease_many(1)
        return leases[0] if leases else None

    async def renew(self, lease: PromptLease) -> None:
        """Extend ``lease``; :class:`LeaseLost` when another worker holds the prompt now."""
        fence = keys.prompt_fence(self.config.run_id, lease.prompt_id)
        held = await self._renew(
            keys=[self._lease_keys[0], fence], args=[lease.prompt_id, lease.attempt, self._ttl_ms]
        )
        if not int(held):
            raise LeaseLost(f"prompt {lease.prompt_id} attempt {lease.attempt}: lease lost")

    def _check_group(self, lease: PromptLease, records: list[rollout_pb2.Rollout]) -> None:
        cfg = self.config
        if len(records) != cfg.group_size:
            raise InvalidGroup("records", f"{len(records)} records, group_size is {cfg.group_size}")
        for i, rec in enumerate(records):
            if (rec.prompt_id, rec.attempt) != (lease.prompt_id, lease.attempt):
                raise InvalidGroup(f"records[{i}].prompt_id", "does not match the lease")
            if rec.group_index != i or rec.group_size != cfg.group_size or rec.run_id != cfg.run_id:
                raise InvalidGroup(f"records[{i}].group_index", "must be group indices 0..K-1 in order")
            if rec.rollout_id != rollout_id(cfg.run_id, rec.prompt_id, rec.group_index, rec.attempt):
                raise InvalidGroup(f"records[{i}].rollout_id", "not the deterministic id of this sample")

    def _entries(self, lease: PromptLease, records: list[rollout_pb2.Rollout]) -> list[dict[bytes, bytes]]:
        self._check_group(lease, records)
        group, size = f"{lease.prompt_id}:{lease.attempt}".encode(), str(self.config.group_size).encode()
        return [{F_ROLLOUT_ID: rec.rollout_id.encode(), F_GROUP: group, F_GROUP_SIZE: size,
                 F_DATA: rec.SerializeToString()} for rec in records]  # fmt: skip

    async def publish(self, lease: PromptLease, records: list[rollout_pb2.Rollout]) -> PublishResult:
        """Append the whole group atomically; a retry of a published group is a no-op.

        WATCH on the prompt's fence key, then one MULTI of the K XADDs and FINISH_LUA (dedup ids,
        lease and fence removal, accepted count). The payloads never pass through Lua, which costs
        Redis about twice the CPU of the XADDs themselves. The fence is deleted in the same
        transaction that adds the entries, so "fence still holds my attempt" means "not published
        yet"; anything else is told apart through the dedup set.
        """
        entries = self._entries(lease, records)
        for _ in range(_PUBLISH_TRIES):
            try:
                return await self._publish_once(lease, entries)
            except redis.WatchError:
                # The fence changed (the lease was taken over) or the connection dropped while
                # watching (the EXEC may have run): look again.
                continue
        raise LeaseLost(f"prompt {lease.prompt_id} attempt {lease.attempt}: publish kept conflicting")

    async def _publish_once(self, lease: PromptLease, entries: list[dict[bytes, bytes]]) -> PublishResult:
        run = self.config.run_id
        fence = keys.prompt_fence(run, lease.prompt_id)
        rids = [e[F_ROLLOUT_ID] for e in entries]
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(fence)
            held = await pipe.get(fence)
            if held is None or int(held) != lease.attempt:
                return await self._not_held(lease, rids[0])
            pipe.multi()
            for fields in entries:
                pipe.xadd(self._stream, fields)  # type: ignore[arg-type]
            await self._finish(
                keys=[keys.prompt_leases(run), fence, self._dedup, keys.producer_counters(run)],
                args=[lease.prompt_id, *rids], client=pipe,
            )  # fmt: skip
            replies = await pipe.execute()
        return PublishResult([i.decode() if isinstance(i, bytes) else str(i) for i in replies[:-1]], False)

    async def _not_held(self, lease: PromptLease, first_rid: bytes) -> PublishResult:
        if await self.client.zscore(self._dedup, first_rid) is not None:
            await self.client.hincrby(keys.producer_counters(self.config.run_id), "duplicates", 1)
            logger.info("prompt %d attempt %d was already published", lease.prompt_id, lease.attempt)
            return PublishResult([], duplicate=True)
        raise LeaseLost(f"prompt {lease.prompt_id} attempt {lease.attempt}: lease lost before publish")

    async def publish_many(
        self, groups: list[tuple[PromptLease, list[rollout_pb2.Rollout]]]
    ) -> list[PublishResult]:
        """:meth:`publish` for several groups concurrently; each group stays all-or-nothing.

        Every group is checked before anything is sent. Groups whose lease was lost are discarded
        and reported together with :class:`LeaseLost` after the others are durable.
        """
        for lease, records in groups:
            self._check_group(lease, records)
        outcomes = await asyncio.gather(*(self.publish(lease, recs) for lease, recs in groups),
                                        return_exceptions=True)  # fmt: skip
        lost = [lease.prompt_id for (lease, _), out in zip(groups, outcomes, strict=True)
                if isinstance(out, LeaseLost)]  # fmt: skip
        for out in outcomes:
            if isinstance(out, BaseException) and not isinstance(out, LeaseLost):
                raise out
        if lost:
            raise LeaseLost(f"prompts {lost}: leases lost before publish; the other groups were published")
        return [out for out in outcomes if isinstance(out, PublishResult)]

    @contextlib.asynccontextmanager
    async def hold(self, lease: PromptLease) -> AsyncIterator[None]:
        """Renew ``lease`` every third of its TTL while the body runs (sampling and scoring can be slow).

        If the lease is lost anyway (Redis unreachable for a whole TTL), ``publish`` raises LeaseLost.
        """

        async def renew_forever() -> None:
            while True:
                await asyncio.sleep(self.config.lease_ttl_s / 3)
                await self.renew(lease)

        task = asyncio.create_task(renew_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLost):
                await task

    async def capacity(self) -> int:
        """Prompt groups that may still be leased now (negative: over the staleness bound)."""
        cfg = self.config
        version, accepted, running = await asyncio.gather(
            self.client.get(keys.policy_version(cfg.run_id)),
            self.client.hget(keys.producer_counters(cfg.run_id), "accepted_groups"),
            self.client.zcard(keys.prompt_leases(cfg.run_id)),
        )
        v, a = int(version or 0), int(accepted or 0)
        return (cfg.max_staleness + v + 1) * cfg.groups_per_step - (a + int(running))


@dataclass(frozen=True)
class WeightsNotice:
    version: int  # policy version the learner published
    path: str  # safetensors file in the run directory


async def current_weights(client: redis.asyncio.Redis, run_id: str) -> WeightsNotice | None:
    """The newest published weights of the run, or None before the learner's first publication."""
    raw: Any = await client.hgetall(keys.policy_weights(run_id))
    if not raw:
        return None
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    path = fields["path"].decode() if isinstance(fields["path"], bytes) else fields["path"]
    return WeightsNotice(int(fields["version"]), path)


async def weights_notices(client: redis.asyncio.Redis, run_id: str) -> AsyncIterator[WeightsNotice]:
    """The current weights, then one notice per publication (learner.checkpoint.publish_weights).

    Pub/sub drops messages while a client is disconnected, so a worker also compares
    :func:`current_weights` before each sampling round; versions only go up.
    """
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.weights_channel(run_id))
    try:
        last = await current_weights(client, run_id)  # read after subscribing: nothing falls between
        if last is not None:
            yield last
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            body = json.loads(message["data"])
            notice = WeightsNotice(int(body["version"]), str(body["path"]))
            if last is None or notice.version > last.version:
                last = notice
                yield notice
    finally:
        await pubsub.aclose()
