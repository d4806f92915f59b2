"""The learner's background writes (``learner/side_writes.py``): order, flush, errors, snapshots.

Pure Python and torch, no processes. Run: ``.venv/bin/pytest tests/test_side_writes.py -q``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from learner.side_writes import SideWrites, snapshot


def test_writes_run_in_submission_order_and_flush_waits_for_them() -> None:
    done: list[int] = []
    release = threading.Event()
    side = SideWrites(depth=4)
    side.submit(lambda: release.wait(5))
    for i in range(3):
        side.submit(lambda i=i: done.append(i))
    assert done == []  # the first write holds the rest back
    release.set()
    side.flush()
    assert done == [0, 1, 2]
    side.close()


def test_an_error_is_raised_by_every_later_call_and_skips_the_writes_after_it() -> None:
    done: list[str] = []
    side = SideWrites()

    def fail() -> None:
        raise OSError("disk full")

    side.submit(fail)
    with pytest.raises(RuntimeError, match="disk full"):
        side.flush()
    with pytest.raises(RuntimeError, match="disk full"):
        side.submit(lambda: done.append("late"))
    with pytest.raises(RuntimeError, match="disk full"):
        side.flush()
    side.close()
    assert done == []


def test_submit_blocks_when_depth_writes_wait() -> None:
    release = threading.Event()
    side = SideWrites(depth=1)
    side.submit(lambda: release.wait(5))  # running
    side.submit(lambda: None)  # waiting: the queue is full now
    third = threading.Thread(target=side.submit, args=(lambda: None,))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # the learner waits instead of running ahead of its writes
    release.set()
    third.join(5)
    assert not third.is_alive()
    side.close()


def test_snapshot_is_a_copy_the_next_optimizer_step_does_not_change() -> None:
    w = torch.ones(3)
    copy = snapshot({"w": w})
    w.add_(1.0)
    assert torch.equal(copy["w"], torch.ones(3))
