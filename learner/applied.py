"""The ids of applied rollouts that a restarted learner must not apply again, kept small.

A rollout can only come back to the learner as a pending stream entry, and pending entries are
never trimmed, so an id needs to be remembered only while its entry id is at or above the trim
point (``learner.queue.RolloutConsumer.trim``), plus a time horizon (``applied_horizon_ms``, 60 s)
that covers acknowledgements lost when Redis crashes with ``appendfsync everysec``. Below that
the entry is gone from Redis for good (and the producer's dedup set guards retries for its own
horizon). The set therefore holds about one checkpoint interval or one minute of rollouts,
whichever is more, not the whole run; ``total`` counts all ever applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def stream_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` → ``(1700000000000, 3)``, ordered as Redis orders entries."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError as err:
        raise ValueError(f"entry_id: {entry_id!r} is not a stream id") from err


@dataclass
class AppliedIds:
    ids: dict[str, str] = field(default_factory=dict)  # rollout id -> stream entry id
    total: int = 0  # rollouts applied over the whole run

    def __contains__(self, rollout_id: object) -> bool:
        return rollout_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, rollout_id: str, entry_id: str) -> None:
        stream_id(entry_id)
        if rollout_id not in self.ids:
            self.total += 1
        self.ids[rollout_id] = entry_id

    def prune_below(self, entry_id: str) -> int:
        """Forget ids whose entries lie below ``entry_id`` (trimmed away); returns how many."""
        floor = stream_id(entry_id)
        old = [r for r, e in self.ids.items() if stream_id(e) < floor]
        for r in old:
            del self.ids[r]
        return len(old)

    def to_state(self) -> dict[str, Any]:
        return {"ids": dict(self.ids), "total": self.total}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AppliedIds:
        ids = state.get("ids", {})
        valid = isinstance(ids, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in ids.items()
        )
        if not valid:
            raise ValueError("applied.ids: must map rollout ids to stream entry ids")
        return cls(ids=dict(ids), total=int(state.get("total", len(ids))))
