"""A pool of worker processes for CPU-bound verifiers, with a hard per-call deadline.

``WorkerPool.call(target, options, item)`` runs ``module:function`` in a free worker and awaits
its ``Outcome`` without blocking the event loop (replies are read with ``loop.add_reader``).
A call that is cancelled while its worker is busy — the caller's deadline passed — kills that
worker and starts a fresh one, so a stuck regex or sympy never holds a slot forever.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Callable, Mapping
from multiprocessing.process import BaseProcess
from typing import Any

from services.reward.domain import Outcome
from services.reward.errors import RewardError, VerifierFailure

log = logging.getLogger(__name__)
_CTX = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads


def load_callable(target: str) -> Callable[..., Any]:
    """Import ``module:function``; raises VerifierFailure naming what is missing."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise VerifierFailure(f"callable must be 'module:function', got {target!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise VerifierFailure(f"cannot load {target!r}: {err}") from err
    if not callable(fn):
        raise VerifierFailure(f"{target!r} is not callable")
    return fn


def as_outcome(result: Any, reward_names: tuple[str, ...]) -> Outcome:
    """Accept float, (float, detail), {name: float} or Outcome from a user function; check names."""
    if isinstance(result, Outcome):
        values, detail = result.values, result.detail
    elif isinstance(result, tuple) and len(result) == 2:
        values, detail = {reward_names[0]: result[0]}, str(result[1])
    elif isinstance(result, Mapping):
        values, detail = dict(result), ""
    else:
        values, detail = {reward_names[0]: result}, ""
    missing = [n for n in reward_names if n not in values]
    if missing:
        raise VerifierFailure(f"verifier returned no value for {missing}")
    try:
        return Outcome({n: float(values[n]) for n in reward_names}, detail)
    except (TypeError, ValueError) as err:
        raise VerifierFailure(f"verifier returned a non-number: {err}") from err


def _worker_main(conn: multiprocessing.connection.Connection, preload: tuple[str, ...]) -> None:
    """Loop of one worker: receive (target, options, names, prompt, response, reference), reply."""
    for module in preload:
        importlib.import_module(module)
    cache: dict[str, Callable[..., Any]] = {}
    while True:
        try:
            target, options, names, prompt, response, reference = conn.recv()
        except EOFError:
            return
        try:
            fn = cache.get(target) or cache.setdefault(target, load_callable(target))
            conn.send(("ok", as_outcome(fn(prompt, response, reference, **options), names)))
        except RewardError as err:
            conn.send(("error", str(err)))
        except Exception as err:  # a user verifier's bug is that item's ERROR, not the worker's death
            conn.send(("error", f"{type(err).__name__}: {err}"))


class _Worker:
    def __init__(self, preload: tuple[str, ...]) -> None:
        self.conn, child = _CTX.Pipe()
        self.proc: BaseProcess = _CTX.Process(target=_worker_main, args=(child, preload), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        """SIGKILL without blocking the event loop; a daemon thread reaps the process."""
        self.proc.kill()
        self.conn.close()
        threading.Thread(target=self.proc.join, args=(5.0,), daemon=True).start()


class WorkerPool:
    """``size`` worker processes; ``call`` waits for a free one."""

    def __init__(self, size: int, preload: tuple[str, ...] = ()) -> None:
        if size < 1:
            raise ValueError(f"pool size must be ≥ 1, got {size}")
        self.size, self.preload = size, preload  # preload: modules each worker imports at start
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()

    def start(self) -> None:
        for _ in range(self.size):
            self._add()

    def _add(self) -> None:
        worker = _Worker(self.preload)
        self._all.add(worker)
        self._idle.put_nowait(worker)

    async def call(
        self,
        target: str,
        options: dict[str, Any],
        names: tuple[str, ...],
        prompt: str,
        response: str,
        reference: Mapping[str, str],
    ) -> Outcome:
        worker = await self._idle.get()
        try:
            worker.conn.send((target, options, names, prompt, response, dict(reference)))
            kind, payload = await self._reply(worker)
        except BaseException:
            # Cancelled (deadline) or the worker died mid-call: its state is unknown, replace it.
            self._all.discard(worker)
            worker.kill()
            self._add()
            raise
        self._idle.put_nowait(worker)
        if kind == "error":
            raise VerifierFailure(payload)
        assert isinstance(payload, Outcome)
        return payload

    async def _reply(self, worker: _Worker) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            reply: tuple[str, Any] = worker.conn.recv()
        except (EOFError, OSError) as err:
            raise VerifierFailure(f"worker process died (exit code {worker.proc.exitcode})") from err
        return reply

    async def ready(self) -> None:
        """Wait until every worker has started and imported its preloads (a no-op round trip each)."""
        workers = [await self._idle.get() for _ in range(self.size)]
        try:
            for w in workers:
                w.conn.send(("services.reward.pool:_noop", {}, ("noop",), "", "", {}))
            for w in workers:
                await self._reply(w)
        finally:
            for w in workers:
                self._idle.put_nowait(w)

    def close(self) -> None:
        for worker in self._all:
            worker.kill()
        self._all.clear()


def _noop(prompt: str, response: str, reference: Mapping[str, str]) -> float:
    return 0.0
