"""The control-plane process itself: no torch, refuses weak secrets, readiness follows Redis.

Run: ``.venv/bin/pytest tests/test_control_server.py -q`` (about 15 s).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from contracts.redis_server import EmbeddedRedis
from tests.control_stack import TOKEN, wait_http
from tests.procs import ROOT, ServiceProcess, free_port

pytestmark = pytest.mark.integration


def test_control_plane_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import services.control.app, services.control.cli\n"
        "from services.control.app import create_app\n"
        "from services.control.settings import ControlSettings\n"
        "create_app(ControlSettings(dev=True)).openapi()\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("token", [None, "changeme", "short-token", "distill-dev-token"])
def test_refuses_to_start_without_a_strong_token(tmp_path: Path, token: str | None) -> None:
    env = {"DISTILL_API_TOKEN": token} if token is not None else {}
    args = ["--port", str(free_port()), "--redis-url", "redis://127.0.0.1:9/0"]
    proc = ServiceProcess("services.control", args, tmp_path / "log", env=env)
    try:
        assert proc.proc.wait(30) != 0
    finally:
        proc.stop()
    assert "refusing to start" in proc.log() and "DISTILL_API_TOKEN" in proc.log()


def test_dev_mode_starts_with_an_embedded_redis_and_the_dev_token(tmp_path: Path) -> None:
    port = free_port()
    proc = ServiceProcess(
        "services.control",
        ["--dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        tmp_path / "log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/readyz")
        assert (tmp_path / "data" / "redis").is_dir()  # its own redis-server's data
        refused = httpx.post(url + "/v1/runs/x/stop", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401
        accepted = httpx.post(url + "/v1/runs/x/stop", headers={"Authorization": "Bearer distill-dev-token"})
        assert accepted.status_code == 404  # past auth: the run does not exist
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


def test_readyz_follows_redis(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    port = free_port()
    args = ["--port", str(port), "--redis-url", server.url]
    proc = ServiceProcess("services.control", args, tmp_path / "log", env={"DISTILL_API_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/readyz")
        server.kill()
        down = httpx.get(url + "/readyz", timeout=30)
        assert down.status_code == 503 and down.headers["content-type"] == "application/problem+json"
        assert httpx.get(url + "/healthz").status_code == 200  # alive, not ready
        listing = httpx.get(url + "/v1/runs", timeout=30)
        assert listing.status_code == 503 and listing.json()["status"] == 503
        server.start()  # same port: the client reconnects
        assert httpx.get(url + "/readyz", timeout=30).status_code == 200
    finally:
        proc.stop()
        server.stop()
