"""Builtin verifier names checked against a real reward service's ``Info`` (``DISTILL_REWARD_ADDRESS``).

Run: ``.venv/bin/pytest tests/test_control_verifiers.py -q`` (about 10 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from proto.distill.v1 import reward_pb2, reward_pb2_grpc
from tests.control_stack import ControlStack
from tests.procs import ServiceProcess, free_port, wait_serving
from tests.test_control_api import assert_problem

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reward_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("reward") / "reward.log"
    proc = ServiceProcess("services.reward", ["--port", str(port), "--workers", "1"], log)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(proc, address, "distill.v1.RewardService")
        yield address
    finally:
        proc.stop()


def test_builtin_names_are_checked_against_the_reward_service(reward_address: str, tmp_path: Path) -> None:
    stack = ControlStack(tmp_path, {"DISTILL_REWARD_ADDRESS": reward_address})
    try:
        post = lambda name: stack.http.post(  # noqa: E731
            "/v1/verifiers", json={"name": name, "kind": "builtin"}, headers=stack.auth
        )
        unknown = assert_problem(post("no_such_verifier"), 422)
        assert unknown["errors"][0]["field"] == "name"
        assert "serves no verifier 'no_such_verifier'" in unknown["detail"]
        with grpc.insecure_channel(reward_address) as channel:
            info = reward_pb2_grpc.RewardServiceStub(channel).Info(reward_pb2.RewardInfoRequest(), timeout=10)
        served = sorted(v.name for v in info.verifiers)
        assert served and str(served) in unknown["detail"]
        first = served[0]
        assert post(first).status_code == 201
        assert [v["name"] for v in stack.http.get("/v1/verifiers").json()] == [first]
    finally:
        stack.close()


def test_unreachable_reward_service_refuses_builtin_registration(tmp_path: Path) -> None:
    stack = ControlStack(tmp_path, {"DISTILL_REWARD_ADDRESS": f"127.0.0.1:{free_port()}"})
    try:
        body = {"name": "exact_match", "kind": "builtin"}
        problem = assert_problem(stack.http.post("/v1/verifiers", json=body, headers=stack.auth), 422)
        assert "reward service" in problem["detail"] and "unreachable" in problem["detail"]
    finally:
        stack.close()
