"""The ``Verifier`` contract and the verifier that calls a ``module:function`` (built-in or user).

A verifier turns one ``Item`` into an ``Outcome`` or raises a domain error (``VerifierFailure``,
``RemoteUnavailableError``, ``SandboxUnavailableError``); the engine owns deadlines and turns
errors into statuses. Verifiers are async so the event loop never blocks on them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from services.reward.domain import Item, Outcome, VerifierInfo
from services.reward.pool import WorkerPool, as_outcome, load_callable


class Verifier(ABC):
    def __init__(self, info: VerifierInfo, timeout_s: float) -> None:
        self.info = info
        self.timeout_s = timeout_s  # this verifier's own limit per item; a batch deadline may cut it

    @property
    def name(self) -> str:
        return self.info.name

    def missing_fields(self, reference: Mapping[str, str]) -> list[str]:
        """Reference fields this verifier needs that ``reference`` lacks (checked before any work)."""
        return [f for f in self.info.required_fields if f not in reference]

    @abstractmethod
    async def verify(self, item: Item) -> Outcome: ...

    async def close(self) -> None:
        """Release connections or processes this verifier holds."""
        return None  # most verifiers hold none


class FunctionVerifier(Verifier):
    """Runs ``target(prompt, response, reference, **options)`` in the worker pool, or inline.

    Inline is only for functions that are linear in their input and never call user code.
    ``produced`` names what the function returns when it differs from the served reward names
    (a built-in served under another name reports its reward under that name). ``quick`` is an
    inline pre-check (``module:function`` returning an Outcome, or None to use the pool).
    """

    def __init__(
        self,
        info: VerifierInfo,
        timeout_s: float,
        target: str,
        options: dict[str, Any],
        pool: WorkerPool | None,
        produced: tuple[str, ...] | None = None,
        quick: str | None = None,
    ) -> None:
        super().__init__(info, timeout_s)
        self.target, self.options, self.pool = target, options, pool
        self.produced = produced or info.reward_names
        self._inline = load_callable(target) if pool is None else None
        # An inline pre-check that settles easy items (returns None to defer to the pool).
        self._quick = load_callable(quick) if quick is not None else None

    def score_now(self, item: Item) -> Outcome | None:
        """The outcome when it is cheap to get on the caller's thread (inline function, or the
        quick pre-check settles it); None when the item needs the worker pool."""
        if self._inline is not None:
            result = self._inline(item.prompt, item.response, item.reference, **self.options)
            return self._rename(as_outcome(result, self.produced))
        if self._quick is not None:
            early = self._quick(item.prompt, item.response, item.reference, **self.options)
            if early is not None:
                return self._rename(as_outcome(early, self.produced))
        return None

    async def verify(self, item: Item) -> Outcome:
        now = self.score_now(item)
        if now is not None:
            return now
        assert self.pool is not None
        outcome = await self.pool.call(
            self.target, self.options, self.produced, item.prompt, item.response, item.reference
        )
        return self._rename(outcome)

    def _rename(self, outcome: Outcome) -> Outcome:
        if self.produced == self.info.reward_names:
            return outcome
        renamed = {
            mine: outcome.values[theirs]
            for mine, theirs in zip(self.info.reward_names, self.produced, strict=True)
        }
        return Outcome(renamed, outcome.detail)
