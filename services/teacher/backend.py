"""The backend contract the servicer talks to, and the batched adapter both backends use.

A backend is a synchronous ``Scorer`` (torch or vLLM, run in a worker thread) wrapped in
``BatchedBackend``, which gives the servicer an async ``score`` with dynamic batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.teacher.batching import DynamicBatcher
from services.teacher.domain import ItemScores, ScoreItem, ScoreParams, TeacherInfo

Work = tuple[ScoreItem, ScoreParams]


class TeacherBackend(Protocol):
    """What the gRPC servicer needs of a loaded teacher."""

    @property
    def info(self) -> TeacherInfo: ...

    async def score(self, items: Sequence[ScoreItem], params: ScoreParams) -> list[ItemScores]: ...

    async def close(self) -> None: ...


class Scorer(Protocol):
    """A loaded model that scores a batch synchronously (called from one worker thread)."""

    @property
    def info(self) -> TeacherInfo: ...

    def score_batch(self, work: Sequence[Work]) -> list[ItemScores]: ...


class BatchedBackend:
    """A ``TeacherBackend`` over a ``Scorer``: concurrent requests share forward passes."""

    def __init__(self, scorer: Scorer, max_wait_s: float = 0.0) -> None:
        self.scorer = scorer
        self.batcher: DynamicBatcher[Work, ItemScores] = DynamicBatcher(
            scorer.score_batch,
            tokens=lambda w: int(w[0].token_ids.shape[0]),
            token_budget=scorer.info.max_batch_tokens,
            max_wait_s=max_wait_s,
        )
        self.batcher.start()

    @property
    def info(self) -> TeacherInfo:
        return self.scorer.info

    async def score(self, items: Sequence[ScoreItem], params: ScoreParams) -> list[ItemScores]:
        return await self.batcher.submit([(it, params) for it in items])

    async def close(self) -> None:
        await self.batcher.close()
