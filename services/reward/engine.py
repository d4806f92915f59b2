"""Runs a batch of items through their verifiers under one deadline and reports every reward.

Each (item, verifier) runs as its own task with limit min(verifier's timeout, time left in the
batch); whatever is not done by then is reported TIMEOUT while the rest of the batch returns.
Every failure becomes a Reward with a status and a detail: never a silent 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from services.reward.domain import Item, Outcome, Reward, Status, failed
from services.reward.errors import InvalidRequestError, RemoteUnavailableError, RewardError, VerifierTimeout
from services.reward.verifiers.base import FunctionVerifier, Verifier
from services.reward.verifiers.registry import VerifierSet

log = logging.getLogger(__name__)


class RewardEngine:
    def __init__(
        self, verifiers: VerifierSet, default_timeout_s: float = 30.0, max_batch: int = 4096
    ) -> None:
        self.verifiers = verifiers
        self.default_timeout_s = default_timeout_s
        self.max_batch = max_batch

    def validate(self, items: Sequence[Item], timeout_s: float) -> None:
        if not items:
            raise InvalidRequestError("items: the batch is empty")
        if len(items) > self.max_batch:
            raise InvalidRequestError(
                f"items: {len(items)} items exceed the limit of {self.max_batch} per call"
            )
        if not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise InvalidRequestError(f"timeout_s must be finite and ≥ 0, got {timeout_s}")
        for i, item in enumerate(items):
            if not item.verifiers:
                raise InvalidRequestError(f"items[{i}].verifiers is empty: name at least one verifier")
            if len(set(item.verifiers)) != len(item.verifiers):
                raise InvalidRequestError(
                    f"items[{i}].verifiers names a verifier twice: {list(item.verifiers)}"
                )
        self.verifiers.validate(items)

    async def verify(self, items: Sequence[Item], timeout_s: float = 0.0) -> list[list[Reward]]:
        """Rewards per item (verifiers in the item's order); raises InvalidRequestError first if bad."""
        self.validate(items, timeout_s)
        deadline = time.monotonic() + (timeout_s or self.default_timeout_s)
        slots: list[list[list[Reward]]] = [[[] for _ in item.verifiers] for item in items]
        pending: list[tuple[int, int, Coroutine[Any, Any, list[Reward]]]] = []
        for i, item in enumerate(items):
            for j, name in enumerate(item.verifiers):
                verifier = self.verifiers.by_name[name]
                # Microseconds of trusted, linear work settle many items: a task each would cost more.
                now = _score_now(verifier, item) if isinstance(verifier, FunctionVerifier) else None
                if now is not None:
                    slots[i][j] = now
                else:
                    pending.append((i, j, self._one(verifier, item, deadline)))
        done = await asyncio.gather(*(job for _, _, job in pending))
        for (i, j, _), rewards in zip(pending, done, strict=True):
            slots[i][j] = rewards
        return [[r for rewards in row for r in rewards] for row in slots]

    async def _one(self, verifier: Verifier, item: Item, deadline: float) -> list[Reward]:
        names, name = verifier.info.reward_names, verifier.name
        limit = min(verifier.timeout_s, deadline - time.monotonic())
        if limit <= 0:
            return failed(name, names, Status.TIMEOUT, "batch deadline passed before the verifier started")
        try:
            result: Outcome | RewardError = await asyncio.wait_for(verifier.verify(item), limit)
        except TimeoutError:
            return failed(name, names, Status.TIMEOUT, f"no result within {limit:.3g} s")
        except RewardError as err:
            result = err
        return _rewards(verifier, result)


def _score_now(verifier: FunctionVerifier, item: Item) -> list[Reward] | None:
    try:
        result: Outcome | RewardError | None = verifier.score_now(item)
    except RewardError as err:
        result = err
    return None if result is None else _rewards(verifier, result)


def _rewards(verifier: Verifier, result: Outcome | RewardError) -> list[Reward]:
    """The rewards of an outcome, or of the domain error a verifier raised: never a silent 0."""
    names, name = verifier.info.reward_names, verifier.name
    if isinstance(result, VerifierTimeout):
        return failed(name, names, Status.TIMEOUT, str(result))
    if isinstance(result, RemoteUnavailableError):
        return failed(name, names, Status.UNAVAILABLE, str(result))
    if isinstance(result, RewardError):  # VerifierFailure, SandboxUnavailableError, ...
        return failed(name, names, Status.ERROR, str(result))
    bad = [n for n in names if not math.isfinite(result.values[n])]
    if bad:
        return failed(name, names, Status.ERROR, f"verifier returned a non-finite value for {bad}")
    return [Reward(name, n, result.values[n], Status.OK, result.detail[:300]) for n in names]
