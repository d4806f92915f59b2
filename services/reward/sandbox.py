"""Run untrusted Python in a confined child process (the code verifier's sandbox).

Each run gets a fresh temporary work dir, a stripped environment, an isolated interpreter
(``python -I -S``) and ``jail.py``'s confinement: new network namespace (no interface but a
down loopback), new PID namespace (the tree dies with its PID 1), private /proc, a per-slot
unprivileged uid when the service runs as root (so RLIMIT_NPROC binds and other processes'
/proc entries are unreadable), Landlock (writes only in the work dir, no TCP), and rlimits on
CPU time, address space, processes, file size and open files. The service kills the whole
process group at the wall-time limit. When any of that cannot be set up the run fails with
``SandboxUnavailableError``: code is never run unconfined.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.reward.errors import SandboxUnavailableError

log = logging.getLogger(__name__)

JAIL = Path(__file__).with_name("jail.py")
EXIT_UNAVAILABLE = 97  # mirrors jail.EXIT_UNAVAILABLE (jail.py is stdlib-only and not imported)
SAFE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # wall-clock limit of one run; the process group is killed after it
    cpu_s: int = 5  # RLIMIT_CPU per process (SIGXCPU, then SIGKILL one second later)
    memory_bytes: int = 512 * 1024 * 1024  # RLIMIT_AS per process
    processes: int = 16  # RLIMIT_NPROC for the slot's uid (or user namespace)
    file_bytes: int = 16 * 1024 * 1024  # RLIMIT_FSIZE: largest file the program may write
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1024 * 1024  # stdout/stderr kept by the service; more kills the run


@dataclass(frozen=True)
class SandboxConfig:
    limits: SandboxLimits = SandboxLimits()
    max_concurrency: int = 4  # runs at once; each holds one slot (and, as root, one uid)
    uid_base: int = 61000  # slot i runs as uid_base + i when the service is root
    python: str | None = None  # interpreter for the program (stdlib only); None: see sandbox_python()
    tmp_root: str | None = None  # parent of the per-run work dirs (default: the system temp dir)


@dataclass(frozen=True)
class SandboxOutcome:
    exit_code: int  # the program's exit code, 128+signal if killed by one, -1 on wall timeout
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool  # killed at the wall-time limit
    truncated: bool  # killed because its output went past output_bytes


class _Capped:
    """Collects a stream up to ``cap`` bytes; calls ``on_overflow`` once when it goes past."""

    def __init__(self, cap: int, on_overflow: asyncio.Event) -> None:
        self.cap, self.on_overflow, self.parts, self.size = cap, on_overflow, list[bytes](), 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            if self.size < self.cap:
                self.parts.append(chunk[: self.cap - self.size])
            self.size += len(chunk)
            if self.size > self.cap:
                self.on_overflow.set()

    def text(self) -> str:
        return b"".join(self.parts).decode(errors="replace")


def _reachable_by_others(path: Path) -> bool:
    """Whether a uid other than ours can traverse to ``path`` and execute it (its ``o+x`` bits)."""
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])
    except OSError:
        return False


def sandbox_python(configured: str | None) -> str:
    """The interpreter for sandboxed programs: configured, ours, or a system one the slot uid can run.

    As root the program runs under an unprivileged uid, which must be able to reach the
    interpreter and its stdlib (ours may live under a private home such as /root).
    """
    ours = Path(os.path.realpath(sys.executable))
    candidates = (
        [Path(configured)] if configured else [ours, Path("/usr/bin/python3"), Path("/usr/local/bin/python3")]
    )
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if real.is_file() and (os.geteuid() != 0 or _reachable_by_others(real)):
            return str(real)
    raise SandboxUnavailableError(
        f"no Python interpreter the sandbox can run among {[str(c) for c in candidates]} "
        "(missing, or private to root); set the sandbox python option"
    )


class Sandbox:
    """Runs programs confined, at most ``max_concurrency`` at a time."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.unavailable: str | None = None  # why confinement is impossible here; then run() refuses
        self.python = ""
        try:
            self.python = sandbox_python(config.python)
        except SandboxUnavailableError as err:
            self.unavailable = str(err)
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(config.max_concurrency):
            self._slots.put_nowait(slot)

    async def run(self, files: dict[str, str], argv: list[str], stdin: str) -> SandboxOutcome:
        """Write ``files`` into a fresh work dir and run ``python -I -S *argv`` there, confined."""
        if self.unavailable is not None:
            raise SandboxUnavailableError(self.unavailable)
        slot = await self._slots.get()
        workdir = Path(tempfile.mkdtemp(prefix="reward-sandbox-", dir=self.config.tmp_root))
        try:
            uid = self._prepare(workdir, files, slot)
            outcome = await self._spawn(workdir, uid, argv, stdin)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._slots.put_nowait(slot)
        if outcome.exit_code == EXIT_UNAVAILABLE and outcome.stderr.startswith("sandbox unavailable"):
            raise SandboxUnavailableError(outcome.stderr.strip())
        return outcome

    def _prepare(self, workdir: Path, files: dict[str, str], slot: int) -> int | None:
        for name, text in files.items():
            (workdir / name).write_text(text)
        if os.geteuid() != 0:
            return None
        uid = self.config.uid_base + slot
        for path in [workdir, *workdir.iterdir()]:
            os.chown(path, uid, uid)
        return uid

    async def _spawn(self, workdir: Path, uid: int | None, argv: list[str], stdin: str) -> SandboxOutcome:
        lim = self.config.limits
        cfg = {
            "workdir": str(workdir),
            "uid": uid,
            "python": self.python,
            "argv": argv,
            "env": SAFE_ENV,
            "limits": {
                "cpu_s": lim.cpu_s,
                "memory_bytes": lim.memory_bytes,
                "processes": lim.processes,
                "file_bytes": lim.file_bytes,
                "open_files": lim.open_files,
            },
        }
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "-I",
            "-S",
            str(JAIL),
            json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=SAFE_ENV,
            cwd=workdir,
            start_new_session=True,
        )
        overflow = asyncio.Event()
        out, err = _Capped(lim.output_bytes, overflow), _Capped(lim.output_bytes, overflow)
        timed_out = await self._supervise(proc, stdin, out, err, overflow)
        return SandboxOutcome(
            exit_code=-1 if timed_out else _exit_code(proc.returncode),
            stdout=out.text(),
            stderr=err.text(),
            wall_s=time.monotonic() - start,
            timed_out=timed_out,
            truncated=overflow.is_set(),
        )

    async def _supervise(
        self,
        proc: asyncio.subprocess.Process,
        stdin: str,
        out: _Capped,
        err: _Capped,
        overflow: asyncio.Event,
    ) -> bool:
        """Feed stdin, collect output, and kill the group at the wall limit or on output overflow."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        finished: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(proc.wait(), out.drain(proc.stdout), err.drain(proc.stderr))
        )
        overflowed: asyncio.Future[Any] = asyncio.ensure_future(overflow.wait())
        try:
            done, _ = await asyncio.wait(
                {finished, overflowed}, timeout=self.config.limits.wall_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            # Cancelled (the item's deadline passed, or shutdown): the program must not outlive us,
            # and it is reaped here so no zombie or open pipe is left behind.
            _kill_group(proc.pid)
            await asyncio.wait({finished}, timeout=5.0)
            raise
        finally:
            overflowed.cancel()
        if finished in done:
            return False
        _kill_group(proc.pid)
        await finished
        return not overflow.is_set()

    async def probe(self) -> None:
        """Run a trivial program; raises SandboxUnavailableError when confinement cannot be set up."""
        try:
            outcome = await self.run({"probe.py": "print(6 * 7)"}, ["probe.py"], "")
        except SandboxUnavailableError as err:
            self.unavailable = str(err)
            raise
        if outcome.exit_code != 0 or outcome.stdout.strip() != "42":
            self.unavailable = f"sandbox probe failed: exit {outcome.exit_code}: {outcome.stderr[-300:]}"
            raise SandboxUnavailableError(self.unavailable)


def _exit_code(returncode: int | None) -> int:
    assert returncode is not None
    return 128 - returncode if returncode < 0 else returncode


def _kill_group(pgid: int) -> None:
    # The launcher leads its own session; SIGKILL to the group takes PID 1 of the namespace
    # with it, and the kernel then kills everything left inside that namespace.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        log.debug("process group %d already gone", pgid)
