"""The code sandbox contains hostile programs (RELIABILITY items 20 and 21), run for real here.

Each test runs a real confined child process. They need Linux namespaces and Landlock; where
the sandbox cannot be set up they are skipped with the reason, and the fail-closed test in
test_reward_verifiers.py covers that case.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.reward.domain import Item, Outcome
from services.reward.errors import SandboxUnavailableError, VerifierFailure, VerifierTimeout
from services.reward.sandbox import JAIL, Sandbox, SandboxConfig, SandboxLimits, sandbox_python
from services.reward.verifiers.code import CodeVerifier
from services.reward.verifiers.registry import get_builtin

pytestmark = pytest.mark.integration  # every test here starts real confined processes

LIMITS = SandboxLimits(wall_s=4.0, cpu_s=2, memory_bytes=256 * 1024 * 1024, processes=8)


def _sandbox() -> Sandbox:
    sandbox = Sandbox(SandboxConfig(limits=LIMITS, max_concurrency=2))
    try:
        asyncio.run(sandbox.probe())
    except SandboxUnavailableError as err:
        pytest.skip(f"sandbox unavailable on this machine: {err}")
    return sandbox


def _code(case_timeout_s: float = 1.0) -> CodeVerifier:
    from services.reward.domain import VerifierInfo

    info = VerifierInfo("code", "code", get_builtin("code").reward_names)
    return CodeVerifier(info, 30.0, _sandbox(), case_timeout_s)


def _run(program: str, reference: dict[str, str] | None = None, case_timeout_s: float = 1.0) -> Outcome:
    item = Item("p", f"```python\n{program}\n```", reference or {"test_code": "pass"}, ("code",))
    return asyncio.run(_code(case_timeout_s).verify(item))


def _plain(program: str) -> str:
    """Run ``program`` directly in the sandbox (no harness); its stdout."""
    sandbox = _sandbox()
    outcome = asyncio.run(sandbox.run({"p.py": program}, ["p.py"], ""))
    assert outcome.exit_code == 0, outcome.stderr
    return outcome.stdout


@pytest.fixture
def listener() -> Iterator[int]:
    """A real TCP server on host loopback that records whether anyone connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    hits: list[bool] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                hits.append(True)
                conn.close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()
    assert not hits, "the sandboxed program reached the host's loopback server"


def test_passing_and_failing_programs_score() -> None:
    tests = json.dumps([{"input": "2\n", "output": "4"}, {"input": "5\n", "output": "10\n"}])
    good = _run("print(int(input()) * 2)", {"tests": tests})
    assert good.values == {"code": 1.0} and "2/2" in good.detail
    half = _run("n = int(input())\nprint(4 if n == 2 else 0)", {"tests": tests})
    assert half.values == {"code": 0.5}
    failing = _run("def f(x): return x", {"test_code": "assert f(1) == 2"})
    assert failing.values == {"code": 0.0} and "AssertionError" in failing.detail


def test_infinite_loop_is_a_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(VerifierTimeout):
        _run("while True: pass")
    assert time.monotonic() - start < LIMITS.wall_s + 2


def test_loop_that_ignores_the_alarm_hits_the_cpu_limit() -> None:
    program = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True: pass"
    with pytest.raises(VerifierTimeout, match=r"CPU-time limit|wall-time limit"):
        _run(program)


def test_sleeping_program_is_killed_at_the_wall_limit() -> None:
    program = "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(60)"
    start = time.monotonic()
    with pytest.raises(VerifierTimeout, match="wall-time limit"):
        _run(program)
    assert time.monotonic() - start < LIMITS.wall_s + 2


def test_fork_bomb_is_contained() -> None:
    with pytest.raises((VerifierFailure, VerifierTimeout), match=r"process limit|time limit"):
        _run("import os\nwhile True:\n    os.fork()")
    # Nothing of it survives: no process of a sandbox slot's uid is left on the host.
    _assert_no_slot_processes(range(SandboxConfig().uid_base, SandboxConfig().uid_base + 2))


def _assert_no_slot_processes(slot_uids: range) -> None:
    if os.geteuid() != 0:
        return  # unprivileged runs share our uid: nothing to tell them apart by
    deadline = time.monotonic() + 5.0
    while leftovers := [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid(p) in slot_uids]:
        assert time.monotonic() < deadline, f"sandbox processes left behind: {leftovers}"
        time.sleep(0.1)


def _uid(proc_dir: Path) -> int:
    try:
        return proc_dir.stat().st_uid
    except FileNotFoundError:
        return -1


def test_memory_hog_is_an_error() -> None:
    with pytest.raises(VerifierFailure, match="memory limit"):
        # A generous case time: on a loaded machine the hog must reach the memory limit first.
        _run("hog = []\nwhile True:\n    hog.append(bytearray(10 * 1024 * 1024))", case_timeout_s=3.5)


def test_network_egress_fails(listener: int) -> None:
    program = (
        "import socket\nfor host in ('127.0.0.1', '10.0.0.1', '1.1.1.1'):\n"
        f"    try:\n        socket.create_connection((host, {listener}), timeout=1)\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as err: print('blocked', host, err.errno)\n"
    )
    out = _plain(program)
    assert "CONNECTED" not in out and out.count("blocked") == 3


def test_writes_outside_the_work_dir_fail(tmp_path: Path) -> None:
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    tmp_path.chmod(0o755)
    targets = [
        open_dir / "evil",
        Path("/tmp") / f"evil-{os.getpid()}",
        Path("/dev/shm") / "evil",
        Path.home() / "x",
    ]
    program = (
        f"import os\nfor path in {[str(t) for t in targets]!r}:\n"
        "    try:\n        open(path, 'w').write('x'); print('WROTE', path)\n"
        "    except OSError as err: print('blocked', path)\n"
        "open('inside.txt', 'w').write('ok'); print('inside ok')\n"
    )
    out = _plain(program)
    assert "WROTE" not in out and "inside ok" in out
    assert not any(t.exists() for t in targets)


def test_service_environment_is_not_readable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARD_TEST_SECRET", "hunter2-secret")
    program = (
        "import os\nprint(sorted(os.environ))\nleaked = []\n"
        f"for pid in [{os.getpid()}, {os.getppid()}]:\n"
        "    try: leaked.append(open(f'/proc/{pid}/environ').read())\n"
        "    except OSError as err: print('blocked', pid)\n"
        "print('LEAK' if any('hunter2' in t for t in leaked) else 'clean')\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]), 'pids visible')\n"
    )
    out = _plain(program)
    assert "hunter2" not in out and "clean" in out
    assert "REWARD_TEST_SECRET" not in out
    visible = int(out.strip().splitlines()[-1].split()[0])
    assert visible <= 3  # its own PID namespace: init, the program, nothing of the host


def test_output_flood_is_cut_off() -> None:
    sandbox = _sandbox()
    outcome = asyncio.run(
        sandbox.run({"p.py": "import os\nwhile True: os.write(1, b'x' * 65536)"}, ["p.py"], "")
    )
    assert outcome.truncated and len(outcome.stdout) <= LIMITS.output_bytes


def test_jail_refuses_when_a_confinement_step_fails(tmp_path: Path) -> None:
    # A work dir that does not exist makes the Landlock rule fail: the launcher must refuse.
    limits = {"cpu_s": 1, "memory_bytes": 1 << 28, "processes": 8, "file_bytes": 1 << 20, "open_files": 32}
    python = sandbox_python(None)
    cfg = {"workdir": str(tmp_path / "missing"), "uid": None, "python": python, "argv": ["p.py"], "env": {},
           "limits": limits}  # fmt: skip
    done = subprocess.run([python, "-I", "-S", str(JAIL), json.dumps(cfg)], capture_output=True, text=True)
    assert done.returncode == 97 and "sandbox unavailable" in done.stderr
    assert done.stdout == ""


def test_cancelled_run_kills_the_program() -> None:
    # The engine's deadline can come before the sandbox's wall limit: cancelling must kill.
    sandbox = Sandbox(SandboxConfig(limits=SandboxLimits(wall_s=60.0), max_concurrency=1))

    async def go() -> None:
        await sandbox.probe()
        run = asyncio.ensure_future(sandbox.run({"p.py": "import time\ntime.sleep(60)"}, ["p.py"], ""))
        await asyncio.sleep(1.0)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    try:
        asyncio.run(go())
    except SandboxUnavailableError as err:
        pytest.skip(f"sandbox unavailable on this machine: {err}")
    _assert_no_slot_processes(range(SandboxConfig().uid_base, SandboxConfig().uid_base + 1))


def test_concurrency_limit_holds_under_a_burst() -> None:
    sandbox = Sandbox(SandboxConfig(limits=LIMITS, max_concurrency=2))
    program = {"p.py": "import time\ntime.sleep(0.3)"}

    async def go() -> float:
        await sandbox.probe()
        start = time.monotonic()
        outcomes = await asyncio.gather(*(sandbox.run(program, ["p.py"], "") for _ in range(20)))
        assert all(o.exit_code == 0 for o in outcomes)
        return time.monotonic() - start

    try:
        elapsed = asyncio.run(go())
    except SandboxUnavailableError as err:
        pytest.skip(f"sandbox unavailable on this machine: {err}")
    # 20 runs of ≥ 0.3 s through 2 slots cannot finish in less than 10 rounds.
    assert elapsed >= 10 * 0.3


UNPRIVILEGED_CHECK = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from services.reward.sandbox import Sandbox, SandboxConfig, SandboxLimits

PROGRAMS = {
    "net": "import socket\\ntry:\\n socket.create_connection(('127.0.0.1', %(port)d), 1)\\n"
           " print('CONNECTED')\\nexcept OSError: print('blocked')",
    "write": "try:\\n open('/tmp/evil-unpriv-%(port)d', 'w').write('x'); print('WROTE')\\n"
             "except OSError: print('blocked')",
    "fork": "import os, time\\ntry:\\n while True:\\n  if os.fork() == 0: time.sleep(5)\\n"
            "except OSError: print('blocked')",
    "pids": "import os\\nprint(sum(p.isdigit() for p in os.listdir('/proc')))",
}

async def main():
    sandbox = Sandbox(SandboxConfig(limits=SandboxLimits(wall_s=4, cpu_s=2, processes=8)))
    await sandbox.probe()
    out = {}
    for name, program in PROGRAMS.items():
        run = await sandbox.run({"p.py": program % {"port": int(sys.argv[2])}}, ["p.py"], "")
        out[name] = run.stdout.strip()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_unprivileged_service_gets_the_same_confinement(listener: int) -> None:
    # The same sandbox started by a non-root user goes through a user namespace instead of a
    # slot uid; here root drops to 'nobody' to exercise that path for real.
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to start an unprivileged service")
    python = sandbox_python(None)
    drop = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    root = str(Path(__file__).resolve().parent.parent)
    command = [*drop, python, "-", root, str(listener)]
    done = subprocess.run(
        command, input=UNPRIVILEGED_CHECK, capture_output=True, text=True, timeout=60, cwd="/"
    )
    if done.returncode != 0 and "sandbox unavailable" in done.stderr:
        pytest.skip(f"unprivileged sandbox unavailable here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["net"] == "blocked" and out["write"] == "blocked" and out["fork"].startswith("blocked")
    assert int(out["pids"]) <= 3
    assert not Path(f"/tmp/evil-unpriv-{listener}").exists()
