"""`distill up` runs the whole platform as child processes; the CLI registers a teacher, starts a
run, follows it to success and plots it; Ctrl-C stops every child (issue 7, RELIABILITY 28/32)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.procs import ROOT, free_port
from tests.training_stack import VOCAB

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
DISTILL = str(Path(sys.executable).parent / "distill")


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout_s: float) -> re.Match[str]:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"{pattern!r} not printed by `distill up`:\n{''.join(seen)}")


def _children(work: Path) -> list[int]:
    """Live processes that `distill up` started for ``work`` (marked by DISTILL_STACK_DIR)."""
    marker = f"DISTILL_STACK_DIR={work.resolve()}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_distill_up_then_teachers_add_run_and_plot(tmp_path: Path) -> None:
    teacher = build_tiny_model(tmp_path / "teacher", TinySpec(vocab_size=VOCAB, hidden_size=32, seed=1))
    student = build_tiny_model(tmp_path / "student", TinySpec(vocab_size=VOCAB, hidden_size=16, seed=2))
    rows = [f'{{"prompt": "w{i} w{i + 1}", "answer": "w{i + 2}"}}' for i in range(20)]
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    work, port = tmp_path / "stack", free_port()
    up = subprocess.Popen(
        [DISTILL, "up", "--teacher", f"t0={teacher}", "--work-dir", str(work), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # as a shell starts a background job: Ctrl-C must still stop everything
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        token = _read_until(up, r"DISTILL_TOKEN=(\S+)", 240).group(1)
        address = _read_until(up, r"teacher t0: (\S+)", 10).group(1)
        env = {**os.environ, "DISTILL_API_URL": f"http://127.0.0.1:{port}", "DISTILL_TOKEN": token}

        def distill(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([DISTILL, *args], env=env, capture_output=True, text=True, timeout=300)

        assert distill("teachers", "add", "t0", address).returncode == 0
        spec = {
            "student": str(student), "dataset": str(tmp_path / "data.jsonl"),
            "teachers": [{"name": "t0"}], "rewards": [{"name": "exact_match", "verifier": "exact_match"}],
            "sampling": {"responses_per_prompt": 2, "prompts_per_step": 2, "max_new_tokens": 4},
            "steps": 3, "checkpoint_interval": 2,
        }  # fmt: skip
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec))
        run = distill("run", str(tmp_path / "run.yaml"))
        assert run.returncode == 0, run.stdout + run.stderr
        run_id = re.search(r"run (run-\w+) succeeded", run.stdout)
        assert run_id, run.stdout
        plot = distill("plot", run_id.group(1), "--out", str(tmp_path / "run.png"))
        assert plot.returncode == 0 and (tmp_path / "run.png").stat().st_size > 10_000
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        up.communicate(timeout=90)  # drains and closes its stdout
    assert up.returncode == 0
    assert not _children(work), "every child of `distill up` stopped"


def _redis(work: Path) -> list[int]:
    """Live processes working in ``work``/redis: the stack's redis-server, which changes to its
    data directory (and rewrites its command line, so that cannot tell)."""
    data = str((work / "redis").resolve())
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd) == data:
                found.append(int(cwd.parent.name))
        except OSError:
            continue
    return found


def test_killing_distill_up_stops_every_child_it_started(tmp_path: Path) -> None:
    """SIGKILL gives `distill up` no chance to stop its children: each gets SIGTERM from the kernel
    (contracts.die_with_parent), so none is left holding its port."""
    teacher = build_tiny_model(tmp_path / "teacher", TinySpec(vocab_size=VOCAB, hidden_size=32, seed=1))
    work, port = tmp_path / "stack", free_port()
    up = subprocess.Popen(
        [DISTILL, "up", "--teacher", f"t0={teacher}", "--work-dir", str(work), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _read_until(up, r"Ctrl-C stops everything", 240)
        started = _children(work)
        assert len(started) >= 5 and _redis(work), "teacher, reward, control, learner, worker and Redis"
    finally:
        up.kill()
        up.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while (_children(work) or _redis(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children(work) and not _redis(work), "a child outlived `distill up`"


@pytest.mark.parametrize("command", ["up", "demo"])
def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path, command: str) -> None:
    work = tmp_path / "stack"
    with socket.socket() as held:  # another server listening on the control plane's port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = subprocess.run([DISTILL, command, "--work-dir", str(work), "--port", str(port)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert f"error: port {port}: the control plane's port is in use" in out.stderr
    assert "choose another port with --port" in out.stderr
    assert not work.exists()  # no model trained (demo), no Redis or other child started
