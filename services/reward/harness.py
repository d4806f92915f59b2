"""In-sandbox test harness for the code verifier (stdlib only; runs as the confined program).

``python -I -S harness.py`` reads a JSON job from stdin: ``{"mode": "stdio", "inputs": [...],
"case_timeout_s": t}`` runs ``solution.py`` once per input with that text as stdin and records
its stdout; ``{"mode": "assert", "test_code": "..."}`` runs ``solution.py`` then the test code in
the same namespace. The result is one JSON line on the original stdout, prefixed ``RESULT ``;
fds 1 and 2 point at /dev/null while user code runs so stray writes cannot forge it. Expected
outputs never enter the sandbox: the service compares them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import traceback
from types import FrameType
from typing import Any

SOLUTION = "solution.py"
MAX_CAPTURE = 1 << 20


class CaseTimeout(BaseException):
    """Raised by SIGALRM when one case runs past its time."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout()


def _run_source(source: str, namespace: dict[str, Any], stdin_text: str) -> str:
    """Execute ``source`` as __main__ with ``stdin_text`` as stdin; return what it printed."""
    out = io.StringIO()
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin_text), out, io.StringIO()
    try:
        exec(compile(source, SOLUTION, "exec"), namespace)
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    finally:
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__
    return out.getvalue()[:MAX_CAPTURE]


def _case(source: str, stdin_text: str, timeout_s: float, test_code: str | None) -> dict[str, Any]:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        output = _run_source(source, namespace, stdin_text)
        if test_code is not None:
            exec(compile(test_code, "tests.py", "exec"), namespace)
        return {"ok": True, "stdout": output}
    except CaseTimeout:
        return {"ok": False, "kind": "timeout", "error": f"case ran past {timeout_s} s"}
    except MemoryError:
        return {"ok": False, "kind": "memory", "error": "memory limit exceeded"}
    except BlockingIOError:  # EAGAIN from fork/clone: the process-count limit
        return {"ok": False, "kind": "processes", "error": "process limit exceeded"}
    except BaseException as err:  # the candidate's own failure is a result, not a harness error
        tail = traceback.format_exception_only(type(err), err)[-1].strip()
        return {"ok": False, "kind": "exception", "error": tail[:500]}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    job = json.loads(sys.stdin.read())
    harness_pid = os.getpid()
    with open(SOLUTION) as f:
        source = f.read()
    result_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGALRM, _alarm)
    timeout_s = float(job.get("case_timeout_s", 5.0))
    if job["mode"] == "stdio":
        cases = [_case(source, text, timeout_s, None) for text in job["inputs"]]
    else:
        cases = [_case(source, "", timeout_s, job["test_code"])]
    if os.getpid() != harness_pid:
        os._exit(0)  # a process the program forked: only the harness itself may report
    os.write(result_fd, ("RESULT " + json.dumps({"cases": cases}) + "\n").encode())


if __name__ == "__main__":
    main()
