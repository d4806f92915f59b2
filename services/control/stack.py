"""The local stack behind ``distill up``: every process of the platform as children of one command.

Starts, in order, an embedded redis-server, the teacher service(s), the reward service, the
control plane, a learner and rollout worker(s), each waiting for the previous to be healthy;
logs go to ``WORK_DIR/logs/NAME.log``. ``stop`` sends SIGTERM in reverse order (the learner
finishes its step and checkpoints) and kills what outlives the grace period; a parent killed
before it can stop them takes every child down with it (``contracts.die_with_parent``), so start
the stack from the main thread. Nothing here imports torch: the model work happens in the children.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from contracts import die_with_parent
from contracts.redis_server import EmbeddedRedis
from services.rpc.healthcheck import check

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A child process of the stack exited or never became healthy; the message has its log tail."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_api_port(port: int) -> None:
    """Raise StackError when something already listens on the control plane's port.

    Otherwise the stack's health check would reach that server (another ``distill up``, say), and
    the first request would fail with its 401 instead of naming the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StackError(
                f"port {port}: the control plane's port is in use ({exc.strerror}); another `distill up` "
                "or `distill demo` may hold it: stop it, or choose another port with --port"
            ) from None


@dataclass
class StackConfig:
    work_dir: Path  # runs/, logs/ and Redis data go here
    teachers: dict[str, Path]  # teacher name → model directory (one teacher service each)
    api_port: int = 8000
    workers: int = 1  # rollout worker processes
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # API bearer token
    grace_s: float = 30.0  # how long a child may take to stop after SIGTERM
    learner_args: tuple[str, ...] = ()  # extra `python -m learner` flags, e.g. --keep-checkpoints
    verifiers_file: Path | None = None  # the reward service's extra verifiers (services/reward/config.py)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class LocalStack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.children: list[_Child] = []
        self.redis: EmbeddedRedis | None = None
        self.teacher_addresses: dict[str, str] = {}
        self.reward_address = ""
        self.api_url = f"http://127.0.0.1:{cfg.api_port}"

    def _torch_threads(self) -> dict[str, str]:
        """Intra-op threads of each torch process (teachers, learner, workers) when the user set none.

        The processes share this machine's cores; letting each use all of them makes OpenMP
        threads spin against each other (on 2 cores a tiny model's step ran 20-40x slower).
        """
        if "OMP_NUM_THREADS" in os.environ:
            return {}
        torch_procs = len(self.cfg.teachers) + 1 + self.cfg.workers
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // torch_procs))}

    def _spawn(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> _Child:
        logs = self.cfg.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"{name}.log"
        with open(path, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches only `distill up`, which then stops the
            # children in order. DISTILL_STACK_DIR marks them as this stack's processes.
            proc = subprocess.Popen(
                die_with_parent.command([sys.executable, "-m", module, *args]),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {}), "DISTILL_STACK_DIR": str(self.cfg.work_dir.resolve())},
            )  # fmt: skip
        child = _Child(name, proc, path)
        self.children.append(child)
        return child

    def _wait(self, child: _Child, healthy: Callable[[], bool], timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise StackError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
            if healthy():
                log.info("%s is up", child.name)
                return
            time.sleep(0.2)
        raise StackError(f"{child.name} not healthy after {timeout_s:.0f} s:\n{child.tail()}")

    def _grpc(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None) -> str:
        port = _free_port()
        child = self._spawn(name, module, [*args, "--port", str(port)], env)
        address = f"127.0.0.1:{port}"
        self._wait(child, lambda: check(address, timeout_s=1.0) == "SERVING")
        return address

    def _api_healthy(self) -> bool:
        try:
            return httpx.get(self.api_url + "/readyz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def start(self) -> LocalStack:
        check_api_port(self.cfg.api_port)
        work = self.cfg.work_dir
        self.redis = EmbeddedRedis(work / "redis", die_with_parent=True).start()
        threads = self._torch_threads()
        env = {"REDIS_URL": self.redis.url, **threads}
        for name, model in self.cfg.teachers.items():
            self.teacher_addresses[name] = self._grpc(
                f"teacher-{name}", "services.teacher", ["--model", str(model)], threads
            )
        verifiers = ["--verifiers", str(self.cfg.verifiers_file)] if self.cfg.verifiers_file else []
        self.reward_address = self._grpc("reward", "services.reward", verifiers)
        control = self._spawn(
            "control", "services.control",
            ["--port", str(self.cfg.api_port), "--redis-url", self.redis.url, "--reward-address",
             self.reward_address, "--log-level", "warning"],
            {"DISTILL_API_TOKEN": self.cfg.token},
        )  # fmt: skip
        self._wait(control, self._api_healthy)
        learner_args = ["--runs-dir", str(work / "runs"), "--poll-s", "0.5", *self.cfg.learner_args]
        self._spawn("learner", "learner", learner_args, env)
        for i in range(self.cfg.workers):
            args = ["--reward-address", self.reward_address, "--poll-s", "0.5", "--worker-id", f"worker-{i}"]
            self._spawn(f"worker-{i}", "services.rollout", args, env)
        return self

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()  # the children already started must not outlive a failed start
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        """Raise StackError naming a child that died."""
        for child in self.children:
            if child.proc.poll() is not None:
                raise StackError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.grace_s
        for child in reversed(self.children):
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", child.name, self.cfg.grace_s)
                child.proc.kill()
                child.proc.wait()
        self.children = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
