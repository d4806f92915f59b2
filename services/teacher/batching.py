"""Dynamic batching: concurrent requests share forward passes up to a padded-token budget.

Submitters await futures on the event loop; one task gathers what is queued (FIFO) into a batch
whose padded size (rows × longest row) stays within the budget, and runs it in a single worker
thread so the event loop never blocks and forward passes never overlap. Requests that arrive
while a forward pass runs share the next one, so batching costs an idle server no latency;
``max_wait_s`` > 0 additionally holds a batch that is not full for company. Work whose caller has
gone (deadline passed, call cancelled) is dropped before it costs a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
W = TypeVar("W")
R = TypeVar("R")


@dataclass
class _Pending(Generic[W, R]):
    work: W
    tokens: int
    future: asyncio.Future[R]


class DynamicBatcher(Generic[W, R]):
    """Runs ``run(batch) -> results`` (same order) over batches of at most ``token_budget`` padded tokens.

    A single work item longer than the budget runs alone rather than being refused.
    """

    def __init__(
        self,
        run: Callable[[list[W]], Sequence[R]],
        tokens: Callable[[W], int],
        token_budget: int,
        max_wait_s: float = 0.0,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self._run, self._tokens, self._budget, self._max_wait = run, tokens, token_budget, max_wait_s
        self._pending: deque[_Pending[W, R]] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-forward")
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0  # how many forward batches ran; read by tests and benchmarks

    def start(self) -> None:
        """Start the gathering task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="teacher-batcher")

    async def submit(self, works: Sequence[W]) -> list[R]:
        """Queue ``works`` and wait for all their results; cancelling the caller drops what has not run."""
        if self._task is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for w in works:
            fut: asyncio.Future[R] = loop.create_future()
            self._pending.append(_Pending(w, self._tokens(w), fut))
            futures.append(fut)
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for p in self._pending:
            p.future.cancel()
        self._executor.shutdown(wait=True)

    def _take(self) -> list[_Pending[W, R]]:
        batch: list[_Pending[W, R]] = []
        longest = 0
        while self._pending:
            head = self._pending[0]
            if head.future.done():  # cancelled by its caller: never run it
                self._pending.popleft()
                continue
            grown = max(longest, head.tokens)
            if batch and grown * (len(batch) + 1) > self._budget:
                break
            batch.append(self._pending.popleft())
            longest = grown
        return batch

    def _budget_filled(self) -> bool:
        longest = max((p.tokens for p in self._pending), default=0)
        return longest * len(self._pending) >= self._budget

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self._max_wait > 0 and not self._budget_filled():
                await asyncio.sleep(self._max_wait)  # let concurrent callers join this batch
            batch = self._take()
            if not self._pending:
                self._wakeup.clear()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, [p.work for p in batch])
            except Exception as err:  # handed to every caller of the batch, never swallowed
                log.exception("forward batch of %d failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            self.batches_run += 1
            for p, r in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
