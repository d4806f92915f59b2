"""A child started through ``contracts.die_with_parent`` stops when its parent is killed; a plain
child does not (which is why the local stack uses it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.procs import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def alive(pid: int) -> bool:
    """Running, not a zombie left to a reaper that does not reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def _parent(script: str) -> tuple[subprocess.Popen[str], list[int]]:
    """A Python process running ``script``, which prints its children's pids on one line."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the parent exited with {proc.wait()} before starting its children"
    return proc, [int(x) for x in line.split()]


def test_a_tied_child_gets_sigterm_when_its_parent_is_killed_and_a_plain_one_lives_on() -> None:
    parent, (tied, plain) = _parent("""
        import subprocess, time
        from contracts.die_with_parent import command
        quiet = {"start_new_session": True, "stdout": subprocess.DEVNULL}  # our pipe's EOF is its exit
        tied = subprocess.Popen(command(["sleep", "60"]), **quiet)
        plain = subprocess.Popen(["sleep", "60"], **quiet)
        time.sleep(0.5)  # the tied one has exec'd sleep by now
        print(tied.pid, plain.pid, flush=True)
        time.sleep(60)
    """)
    try:
        assert Path(f"/proc/{tied}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"  # exec'd, same pid
        parent.send_signal(signal.SIGKILL)  # no handler runs: nothing in the parent can clean up
        parent.communicate(timeout=10)  # also closes its stdout
        assert _wait_gone(tied, 10.0), "the tied child outlived its parent"
        assert alive(plain), "a plain child in its own session outlives its parent"
    finally:
        for pid in (tied, plain):
            subprocess.run(["kill", "-KILL", str(pid)], capture_output=True)


def test_an_embedded_redis_tied_to_its_parent_stops_with_it(tmp_path: Path) -> None:
    parent, (redis_pid,) = _parent(f"""
        import time
        from contracts.redis_server import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path / "redis")!r}, die_with_parent=True).start()
        print(server.pid, flush=True)
        time.sleep(60)
    """)
    try:
        assert alive(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.communicate(timeout=10)  # also closes its stdout
        assert _wait_gone(redis_pid, 10.0), "redis-server outlived the process that embedded it"
    finally:
        subprocess.run(["kill", "-KILL", str(redis_pid)], capture_output=True)


def test_a_child_whose_parent_is_already_gone_does_not_start() -> None:
    gone = 2**22 + 1  # above Linux's largest pid_max: never this process's parent
    out = subprocess.run([sys.executable, "-m", "contracts.die_with_parent", str(gone), "true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 1
    assert f"parent {gone} is gone; not starting true" in out.stderr


def test_usage_errors_say_what_is_expected() -> None:
    for args in ([], ["123"], ["not-a-pid", "true"]):
        out = subprocess.run([sys.executable, "-m", "contracts.die_with_parent", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.returncode == 1
        assert "usage: python -m contracts.die_with_parent PARENT_PID COMMAND" in out.stderr
