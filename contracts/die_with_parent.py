"""Run a command that is sent SIGTERM when the process that started it dies.

    python -m contracts.die_with_parent PARENT_PID COMMAND [ARGS...]

The local stack (``services.control.stack``) starts its children in sessions of their own, so that a
Ctrl-C reaches only the parent, which then stops them in order. A parent killed before it can
(SIGKILL, SIGTERM without a handler, a crash) used to leave them running, holding their ports: the
next ``distill demo`` found the old control plane answering on its port. Started through this, each
child gets SIGTERM from the kernel when the parent dies (Linux's ``PR_SET_PDEATHSIG``, which
``exec`` keeps) and stops as it would on ``kill``: the learner checkpoints, Redis writes its AOF.

The kernel sends the signal when the *thread* that started the child ends, so start such children
from a thread that lives as long as they should (the main thread: ``distill up``, ``distill demo``
and ``benchmarks.compare`` do). Elsewhere than Linux ``command`` returns the command unchanged.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def command(argv: Sequence[str]) -> list[str]:
    """``argv``, run so that it gets SIGTERM when this process (the thread calling Popen) dies."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-m", __name__, str(os.getpid()), *argv]


def main(args: Sequence[str]) -> None:
    if len(args) < 2 or not args[0].isdigit():
        sys.exit("usage: python -m contracts.die_with_parent PARENT_PID COMMAND [ARGS...]")
    parent, argv = int(args[0]), list(args[1:])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl: no signal would ever come
        sys.exit(f"die_with_parent: parent {parent} is gone; not starting {argv[0]}")
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
