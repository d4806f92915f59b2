"""Consumer side of the rollout queue: exactly-once application on top of at-least-once streams.

The learner loop, top to bottom (see ``tests/queue_harness.py`` for a complete one)::

    consumer = RolloutConsumer(client, config, applied=checkpoint.applied)  # ids from the checkpoint
    batch = consumer.next_batch(num_groups, policy_version)  # whole prompt groups
    ... optimizer step on batch ...
    consumer.mark_applied(batch)
    save_checkpoint(..., applied=consumer.applied.to_state())  # durable first
    consumer.ack_applied(); consumer.trim()                    # then ack, then trim

Reading order per call: the consumer's own pending entries from id 0 (once, after a restart), then
entries idle longer than ``claim_idle_ms`` claimed with XAUTOCLAIM (a dead consumer's, or an
own poison entry coming back), then new entries (``>``). An entry whose rollout id is in
``applied`` is acknowledged without being applied again (RELIABILITY 1-3). An entry that does not
decode or carries NaN/inf stays pending until its delivery count reaches ``max_deliveries`` and
is then dead-lettered with its reason, acknowledged and counted (RELIABILITY 5). A rollout older
than ``max_staleness`` versions is dead-lettered with reason ``stale`` rather than silently
skipped, so every produced id is either applied or in the dead-letter stream (RELIABILITY 9); a
group that lost all its members gives its place in the producers' staleness budget back.
``refresh_claims`` resets the idle time of the entries the learner holds, so a slow but alive
learner is never robbed (RELIABILITY 6); ``next_batch`` calls it every ``claim_idle_ms / 3``, and
a single step longer than that should call it between micro-batches. ``trim`` never goes below
the oldest pending entry nor past the last delivered one (RELIABILITY 7).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from contracts import keys
from contracts.rollout_record import DecodedRollout, RolloutDecodeError, decode_rollout
from learner.applied import AppliedIds, stream_id
from services.rollout.queue import F_DATA, F_GROUP, F_GROUP_SIZE, F_ROLLOUT_ID

logger = logging.getLogger(__name__)

Fields = dict[bytes, bytes]

# KEYS: stream   ARGV: group, consumer, ids...  -> ids no longer owned by this consumer.
# Resets the idle time (XCLAIM JUSTID keeps the delivery count) only of entries still ours:
# a plain XCLAIM would take back an entry that another consumer had rightfully claimed.
REFRESH_LUA = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 or p[1][2] ~= ARGV[2] then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  end
end
return lost
"""


class ClaimLost(RuntimeError):
    """Another consumer claimed entries this learner applied but has not acknowledged yet."""


@dataclass(frozen=True)
class ConsumerConfig:
    run_id: str
    consumer: str  # stable per learner role (e.g. "learner"): a restart then re-reads its own pending at once
    max_staleness: int  # rollouts more than this many versions old are never trained on
    max_deliveries: int = 3  # a rollout that fails to decode this many times is dead-lettered
    claim_idle_ms: int = 60_000  # XAUTOCLAIM entries idle longer than this (> slowest step without refresh)
    claim_interval_s: float = 5.0  # how often to look for such entries
    read_count: int = 64  # entries per XREADGROUP / XAUTOCLAIM call
    block_ms: int = 500  # XREADGROUP BLOCK
    group_wait_s: float = 300.0  # release an incomplete group after this long without a new member
    dedup_horizon_ms: int = 600_000  # producer dedup ids kept at least this long (retry window)
    # Applied ids kept at least this long after their entry was written, beyond the trim point: an
    # ack lost in a Redis crash with appendfsync everysec (~1 s of writes) makes its entry pending
    # again after our in-memory prune, and this keeps that redelivery a no-op.
    applied_horizon_ms: int = 60_000
    dead_letter_maxlen: int = 100_000  # approximate cap of the dead-letter stream

    def __post_init__(self) -> None:
        keys.check_run_id(self.run_id)
        if not self.consumer:
            raise ValueError("consumer: must not be empty")
        if self.max_staleness < 0 or self.max_deliveries < 1 or self.read_count < 1:
            raise ValueError("max_staleness >= 0, max_deliveries >= 1 and read_count >= 1 are required")
        if self.claim_idle_ms < 1 or self.block_ms < 0:
            raise ValueError("claim_idle_ms: must be >= 1; block_ms: must be >= 0")


@dataclass
class QueuedRollout:
    entry_id: str
    rollout: DecodedRollout


@dataclass
class Group:
    key: str  # "{prompt_id}:{attempt}"
    size: int  # group_size the producer declared
    members: list[QueuedRollout] = field(default_factory=list)
    dead: int = 0  # members dead-lettered
    updated: float = field(default_factory=time.monotonic)

    @property
    def complete(self) -> bool:
        return len(self.members) + self.dead >= self.size


@dataclass
class Batch:
    groups: list[Group]

    @property
    def rollouts(self) -> list[QueuedRollout]:
        return [m for g in self.groups for m in sorted(g.members, key=lambda m: m.rollout.group_index)]

    @property
    def entry_ids(self) -> list[str]:
        return [m.entry_id for m in self.rollouts]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RolloutConsumer:
    """The learner's reader of one run's rollout stream (sync redis client: the learner is a torch loop)."""

    def __init__(
        self, client: redis.Redis, config: ConsumerConfig, applied: AppliedIds | None = None
    ) -> None:
        self.client = client
        self.config = config
        self.applied = applied if applied is not None else AppliedIds()
        self.stream = keys.rollout_stream(config.run_id)
        self.group = keys.learner_group(config.run_id)
        self._groups: dict[str, Group] = {}
        self._held: set[str] = set()  # entry ids delivered to us and not acknowledged
        self._to_ack: list[str] = []  # applied, waiting for a durable checkpoint
        self._backlog: str | None = "0"  # own pending entries to re-read after a restart
        self._last_claim = 0.0
        self._last_refresh = time.monotonic()
        self._refresh = client.register_script(REFRESH_LUA)
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; existing groups are left alone."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    # -- reading -------------------------------------------------------------------------------

    def _read(self) -> list[tuple[str, Fields | None]]:
        cfg = self.config
        if self._backlog is not None:
            reply: Any = self.client.xreadgroup(
                self.group, cfg.consumer, {self.stream: self._backlog}, count=cfg.read_count
            )
            entries = reply[0][1] if reply else []
            self._backlog = _s(entries[-1][0]) if entries else None
            return [(_s(i), f or None) for i, f in entries]
        if time.monotonic() - self._last_claim >= cfg.claim_interval_s:
            self._last_claim = time.monotonic()
            claimed = self._autoclaim()
            if claimed:
                return claimed
        new: Any = self.client.xreadgroup(
            self.group, cfg.consumer, {self.stream: ">"}, count=cfg.read_count, block=cfg.block_ms
        )
        return [(_s(i), f) for i, f in new[0][1]] if new else []

    def _autoclaim(self) -> list[tuple[str, Fields | None]]:
        out: list[tuple[str, Fields | None]] = []
        start = "0-0"
        while True:
            reply: Any = self.client.xautoclaim(
                self.stream, self.group, self.config.consumer, self.config.claim_idle_ms,
                start_id=start, count=self.config.read_count,
            )  # fmt: skip
            start = _s(reply[0])
            out += [(_s(i), f) for i, f in reply[1] if _s(i) not in self._held]
            if start == "0-0" or len(out) >= self.config.read_count:
                break
        if out:
            logger.warning("claimed %d entries idle for more than %d ms", len(out), self.config.claim_idle_ms)
        return out

    def next_batch(self, num_groups: int, policy_version: int, timeout_s: float = 30.0) -> Batch:
        """Up to ``num_groups`` whole prompt groups; fewer only when ``timeout_s`` passes first."""
        if num_groups < 1:
            raise ValueError(f"num_groups: must be >= 1, got {num_groups}")
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() - self._last_refresh > self.config.claim_idle_ms / 3000:
                self.refresh_claims()  # entries waiting for the next checkpoint stay ours
            ready = self._ready_groups(num_groups)
            if len(ready) < num_groups or self._backlog is not None:
                # Read (and block) only when the groups read ahead do not fill the batch.
                for entry_id, fields in self._read():
                    self._accept(entry_id, fields, policy_version)
                ready = self._ready_groups(num_groups)
            if len(ready) >= num_groups or (time.monotonic() >= deadline and self._backlog is None):
                for g in ready:
                    del self._groups[g.key]
                    if not g.complete:
                        logger.warning("group %s incomplete after %.0f s, training on it", g.key,
                                       time.monotonic() - g.updated)  # fmt: skip
                        self._count("partial_groups")
                return Batch(self._drop_stale(ready, policy_version))

    def _drop_stale(self, groups: list[Group], version: int) -> list[Group]:
        """Groups read ahead may have aged past the staleness bound while they waited: those are
        dead-lettered too, so nothing older than ``max_staleness`` versions is trained on."""
        fresh = []
        for g in groups:
            oldest = min((m.rollout.policy_version for m in g.members), default=version)
            if version - oldest > self.config.max_staleness:
                self.reject_group(g, "stale", f"policy version {oldest}, learner at {version}")
            else:
                fresh.append(g)
        return fresh

    def _ready_groups(self, limit: int) -> list[Group]:
        now = time.monotonic()
        ready = []
        for key in [k for k, g in self._groups.items() if g.complete and not g.members]:
            del self._groups[key]  # every member was dead-lettered
        for g in self._groups.values():
            stalled = bool(g.members) and now - g.updated > self.config.group_wait_s
            if g.complete or stalled:
                ready.append(g)
            if len(ready) >= limit:
                break
        return ready

    # -- one entry -----------------------------------------------------------------------------

    def _accept(self, entry_id: str, fields: Fields | None, version: int) -> None:
        if entry_id in self._held:
            return
        if not fields:  # pending entry deleted from the stream (XDEL by an operator)
            self._ack_now([entry_id], "deleted")
            return
        rid = _s(fields.get(F_ROLLOUT_ID, b""))
        if rid and rid in self.applied:
            logger.info("rollout %s (entry %s) already applied, acknowledging", rid, entry_id)
            self._ack_now([entry_id], "duplicates")
            return
        try:
            rollout = decode_rollout(fields.get(F_DATA, b""))
        except RolloutDecodeError as err:
            self._poison(entry_id, fields, err.reason, str(err))
            return
        if version - rollout.policy_version > self.config.max_staleness:
            detail = f"policy version {rollout.policy_version}, learner at {version}"
            self._dead_letter(entry_id, fields, "stale", detail)
            return
        group = self._group_of(fields)
        group.members.append(QueuedRollout(entry_id, rollout))
        group.updated = time.monotonic()
        self._held.add(entry_id)

    def _group_of(self, fields: Fields) -> Group:
        key = _s(fields.get(F_GROUP, b"?"))
        if key not in self._groups:
            try:
                size = max(1, int(fields.get(F_GROUP_SIZE, b"1")))
            except ValueError:
                size = 1
            self._groups[key] = Group(key, size)
        return self._groups[key]

    def _deliveries(self, entry_id: str) -> int:
        info = self.client.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        return int(info[0]["times_delivered"]) if info else self.config.max_deliveries

    def _poison(self, entry_id: str, fields: Fields, reason: str, detail: str) -> None:
        deliveries = self._deliveries(entry_id)
        if deliveries < self.config.max_deliveries:
            # Left pending and unrefreshed: XAUTOCLAIM brings it back after claim_idle_ms.
            logger.warning("entry %s failed (%s), delivery %d: %s", entry_id, reason, deliveries, detail)
            return
        self._dead_letter(entry_id, fields, reason, f"{detail} (after {deliveries} deliveries)")

    def reject_group(self, group: Group, reason: str, detail: str) -> None:
        """Dead-letter every member of a delivered group that may not be trained on (e.g. one of
        its rewards failed) and give the group's place in the staleness budget back."""
        for m in group.members:
            self._dead_letter(m.entry_id, {F_ROLLOUT_ID: m.rollout.rollout_id.encode()}, reason, detail)
            self._held.discard(m.entry_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(keys.producer_counters(self.config.run_id), "accepted_groups", -1)
        pipe.hincrby(keys.learner_counters(self.config.run_id), "groups_dropped", 1)
        pipe.execute()

    def _dead_letter(self, entry_id: str, fields: Fields, reason: str, detail: str) -> None:
        dead = {
            b"entry": entry_id, b"reason": reason, b"detail": detail, b"consumer": self.config.consumer,
            **{k: v for k, v in fields.items() if k in (F_ROLLOUT_ID, F_GROUP, F_DATA)},
        }  # fmt: skip
        group = self._group_of(fields) if F_GROUP in fields else None
        if group is not None:
            group.dead += 1
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(
            keys.dead_letter_stream(self.config.run_id), dead,  # type: ignore[arg-type]
            maxlen=self.config.dead_letter_maxlen, approximate=True,
        )  # fmt: skip
        pipe.xack(self.stream, self.group, entry_id)
        pipe.hincrby(keys.learner_counters(self.config.run_id), f"dead:{reason}", 1)
        if group is not None and group.complete and not group.members:
            # A group that will never be trained on gives its place in the staleness budget back;
            # otherwise dropped groups would add up until producers wait forever.
            pipe.hincrby(keys.producer_counters(self.config.run_id), "accepted_groups", -1)
            pipe.hincrby(keys.learner_counters(self.config.run_id), "groups_dropped", 1)
        pipe.execute()
        logger.warning("dead-lettered entry %s: %s: %s", entry_id, reason, detail)

    def _ack_now(self, entry_ids: list[str], counter: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *entry_ids)
        pipe.hincrby(keys.learner_counters(self.config.run_id), counter, len(entry_ids))
        pipe.execute()

    def _count(self, counter: str, n: int = 1) -> None:
        self.client.hincrby(keys.learner_counters(self.config.run_id), counter, n)

    # -- after the step ------------------------------------------------------------------------

    def mark_applied(self, batch: Batch) -> None:
        """Record the batch as applied; its entries wait for the next durable checkpoint."""
        for m in batch.rollouts:
            self.applied.add(m.rollout.rollout_id, m.entry_id)
            self._to_ack.append(m.entry_id)

    def ack_applied(self) -> int:
        """XACK everything applied so far. Call only after the checkpoint that lists them is durable."""
        if not self._to_ack:
            return 0
        n = int(self.client.xack(self.stream, self.group, *self._to_ack))
        self._held.difference_update(self._to_ack)
        self._to_ack = []
        return n

    def refresh_claims(self) -> None:
        """Reset the idle time of every entry we hold (call during long steps); drop ones taken from us."""
        self._last_refresh = time.monotonic()
        held = sorted(self._held)
        if not held:
            return
        reply = self._refresh(keys=[self.stream], args=[self.group, self.config.consumer, *held])
        lost = {_s(i) for i in reply}
        if not lost:
            return
        taken = lost & set(self._to_ack)
        if taken:
            raise ClaimLost(f"{len(taken)} applied entries were claimed by another consumer")
        logger.warning("%d held entries were claimed by another consumer; dropping them", len(lost))
        self._forget(lost)

    def _forget(self, entry_ids: Iterable[str]) -> None:
        gone = set(entry_ids)
        self._held -= gone
        for key, g in list(self._groups.items()):
            g.members = [m for m in g.members if m.entry_id not in gone]
            if not g.members and not g.dead:
                del self._groups[key]

    def trim(self) -> str | None:
        """Delete acknowledged entries below the oldest pending one; prune dedup and applied ids to match.

        Returns the MINID used, or None when nothing was delivered yet.
        """
        summary = self.client.xpending(self.stream, self.group)
        if summary["pending"]:
            minid = _s(summary["min"])
        else:
            info = [g for g in self.client.xinfo_groups(self.stream) if _s(g["name"]) == self.group]
            minid = _s(info[0]["last-delivered-id"]) if info else "0-0"
        if minid == "0-0":
            return None
        # Entries above last-delivered are undelivered; below the oldest pending, all are acknowledged.
        self.client.xtrim(self.stream, minid=minid, approximate=False)
        seconds, micros = self.client.time()
        horizon = int(seconds) * 1000 + int(micros) // 1000 - self.config.dedup_horizon_ms
        self.client.zremrangebyscore(
            keys.producer_dedup(self.config.run_id), "-inf", f"({min(stream_id(minid)[0], horizon)}"
        )
        now_ms = horizon + self.config.dedup_horizon_ms
        floor = min(stream_id(minid), (now_ms - self.config.applied_horizon_ms, 0))
        self.applied.prune_below(f"{floor[0]}-{floor[1]}")
        return minid

    def counters(self) -> dict[str, int]:
        raw = self.client.hgetall(keys.learner_counters(self.config.run_id))
        return {_s(k): int(v) for k, v in raw.items()}
