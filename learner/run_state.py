"""The learner's side of the run-state contract (``contracts.runstate``), over a sync Redis client.

The learner reports start/halt/finish/fail through ``transition`` under WATCH, begins each step
by advancing ``step`` and reading the λ schedules in one atomic script, and appends one metrics
entry per step. With ``sampling.length_curriculum`` it also keeps the response length limit in
``keys.length_curriculum`` (``advance_length``), where the rollout workers read it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

import redis

from contracts import keys
from contracts import runstate as rs
from contracts.runspec import LengthCurriculumSpec, RunSpec
from contracts.schedules import ScheduleTimeline


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_state(client: redis.Redis, run_id: str) -> rs.RunState | None:
    raw = client.hgetall(rs.run_state_key(run_id))
    return rs.RunState.from_hash({_text(k): _text(v) for k, v in raw.items()}) if raw else None


def apply(client: redis.Redis, run_id: str, command: rs.Command, error: str = "") -> rs.RunState:
    """Apply ``command`` to the run's state atomically; InvalidTransition when not allowed."""
    key = rs.run_state_key(run_id)
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                state = read_state(pipe, run_id)
                if state is None:
                    raise rs.InvalidTransition(rs.RunStatus.QUEUED, command)
                status, desired = rs.transition(state.status, state.desired, command)
                now = time.time()
                update = {"status": status, "desired": desired, "updated_at": now,
                          "error": error or state.error}  # fmt: skip
                if command is rs.Command.START and not state.started_at:
                    update["started_at"] = now
                new = state.model_copy(update=update)
                pipe.multi()
                pipe.hset(key, mapping=new.to_hash())  # type: ignore[arg-type]
                pipe.execute()
                return new
            except redis.WatchError:
                continue


def initial_timelines(spec: RunSpec) -> dict[str, ScheduleTimeline]:
    return {r.name: ScheduleTimeline(r.schedule) for r in spec.rewards}


# One round trip, atomic like a transaction: the control plane's schedule changes and stop
# requests land either before this boundary or after it, never half-way.
_BEGIN_STEP_LUA = """
local desired = redis.call('HGET', KEYS[1], 'desired')
local schedules = redis.call('HGETALL', KEYS[2])
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'updated_at', ARGV[2])
return {desired or 'run', schedules}
"""


def begin_step(
    client: redis.Redis, run_id: str, step: int, fallback: Mapping[str, ScheduleTimeline]
) -> tuple[rs.Desired, dict[str, ScheduleTimeline]]:
    """Advance the run to ``step`` and read (desired state, λ timelines) as of that boundary."""
    keys_ = [rs.run_state_key(run_id), rs.run_schedules_key(run_id)]
    desired, flat = client.eval(_BEGIN_STEP_LUA, 2, *keys_, str(step), str(time.time()))
    timelines = dict(fallback)
    for name, data in zip(flat[::2], flat[1::2], strict=True):
        timelines[_text(name)] = ScheduleTimeline.from_dict(json.loads(data))
    return rs.Desired(_text(desired)), timelines


def write_metrics(
    client: redis.Redis, run_id: str, values: Mapping[str, float], maxlen: int = 100_000
) -> None:
    fields = {name: repr(float(v)) for name, v in values.items()}
    client.xadd(rs.run_metrics_key(run_id), fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]


def grow_length(current: int, entropy: float, lc: LengthCurriculumSpec) -> int:
    """Seed 003's entropy-gated length curriculum: the limit grows by ``lc.step`` after a step whose
    mean student entropy is below ``lc.gate`` (the student has become confident at this length),
    never past ``lc.max``."""
    return min(lc.max, current + lc.step) if entropy < lc.gate else min(current, lc.max)


def read_length(client: redis.Redis, run_id: str, lc: LengthCurriculumSpec) -> int:
    """The response length limit in effect: the stored one, else ``lc.start``."""
    return lc.limit(client.hget(keys.length_curriculum(run_id), "max_new_tokens"))


def advance_length(
    client: redis.Redis, run_id: str, lc: LengthCurriculumSpec, entropy: float, step: int
) -> int:
    """Apply ``grow_length`` after learner ``step`` and store the result for the workers.

    Kept in Redis, not in the checkpoint: it outlives a learner restart with the rest of the run's
    state, and a limit grown by steps that a crash then rolled back stays grown (the curriculum
    only ever lengthens, so the workers never see it shrink).
    """
    length = grow_length(read_length(client, run_id, lc), entropy, lc)
    client.hset(keys.length_curriculum(run_id), mapping={"max_new_tokens": str(length), "step": str(step)})
    return length


# KEYS: lease   ARGV: holder, ttl_ms  -> 1 refreshed | 0 held by someone else (or expired)
_REFRESH_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class LearnerLease:
    """This process's exclusive right to train a run, kept alive by a heartbeat thread.

    Claimed with ``SET NX PX``; a thread refreshes it every ``ttl_s / 3`` only while the key
    still names us. A killed or frozen learner stops refreshing, the key expires, and another
    learner may take the run over; ``lost`` tells a frozen one, once it wakes, to step down.
    """

    def __init__(self, client: redis.Redis, run_id: str, holder: str, ttl_s: float = 30.0) -> None:
        self.client, self.key, self.holder = client, rs.run_learner_key(run_id), holder
        self.ttl_ms = int(ttl_s * 1000)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._refresh = client.register_script(_REFRESH_LUA)
        self._thread: threading.Thread | None = None

    def claim(self) -> bool:
        return bool(self.client.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="learner-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                held = self._refresh(keys=[self.key], args=[self.holder, self.ttl_ms])
            except redis.RedisError:
                continue  # Redis restarting: the client's retries ride it out, or the lease lapses
            if not int(held):
                self.lost.set()
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set():
            self.client.delete(self.key)


def claimable_runs(client: redis.Redis) -> list[str]:
    """Runs a learner may take: queued ones, and running ones whose learner stopped heartbeating."""
    out = []
    for raw in client.zrange(rs.runs_index_key(), 0, -1):
        run_id = _text(raw)  # type: ignore[arg-type]
        state = read_state(client, run_id)
        if state is None or state.desired is rs.Desired.STOP:
            continue
        orphaned = state.status is rs.RunStatus.RUNNING and not client.exists(rs.run_learner_key(run_id))
        if state.status is rs.RunStatus.QUEUED or orphaned:
            out.append(run_id)
    return out
