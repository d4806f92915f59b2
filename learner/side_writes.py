"""The learner's per-step writes (weights publication, metrics), run in order off the training thread.

Publishing step n's weights and writing its metrics take a few Redis round trips and a file
write; on a small model that is several percent of a step (benchmarks/bench_learner.py). One
daemon thread runs them in submission order while the next step computes, so versions still only
grow and metrics arrive in step order. ``submit`` blocks once ``depth`` writes are waiting (the
learner never runs far ahead of what workers can see); an error in a write is raised by every
later ``submit`` and ``flush``, and the writes after it are skipped. Nothing durable depends on
these writes: the checkpoint is written on the training thread, and a learner killed before a
publication republishes under a newer version.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch


class SideWrites:
    def __init__(self, depth: int = 2) -> None:
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="learner-side-writes", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every submitted write is done; raise the first error of one."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Finish the waiting writes and stop the thread (errors are left to ``flush``)."""
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:  # after a failure the rest is skipped: order matters
                    job()
            except BaseException as err:  # handed to the training thread
                self._error = err
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a background write failed: {self._error}") from self._error


def snapshot(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of the weights as they are now (the next optimizer step changes them in place)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}
