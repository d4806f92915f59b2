"""The reward service as a real process: built-ins, user verifiers, validation, sandbox, deadlines,
auth, TLS, reflection and graceful shutdown (RELIABILITY items 20–23 through the service)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from proto.distill.v1 import reward_pb2 as pb
from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.client import RewardClient
from services.reward.domain import Item, Reward, Status
from services.reward.errors import InvalidRequestError
from services.rpc.auth import bearer_metadata
from tests.procs import ServiceProcess, free_port, health_status, self_signed_cert, wait_serving

pytestmark = pytest.mark.integration

USER_MODULE = textwrap.dedent(
    """
    import time

    def sleepy(prompt, response, reference):
        time.sleep(float(reference.get("sleep", "0")))
        return {"sleepy": 1.0, "sleepy_len": len(response)}
    """
)
SECRET = "hunter2-reward-secret"
SANDBOX_ARGS = [
    "--sandbox-wall-s",
    "4",
    "--sandbox-cpu-s",
    "2",
    "--sandbox-memory-mb",
    "256",
    "--code-case-timeout-s",
    "1",
]


class _Judge(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        data = json.dumps({"rewards": {"judge": 0.25 if "good" in body["response"] else 0.0}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/judge"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, judge_url: str) -> Iterator[tuple[str, int]]:
    """(address, pid) of a real service process with user verifiers and a secret in its environment."""
    tmp = tmp_path_factory.mktemp("reward")
    (tmp / "user_checks.py").write_text(USER_MODULE)
    config = {
        "verifiers": [
            {
                "kind": "builtin",
                "name": "exact_cs",
                "builtin": "exact_match",
                "options": {"case_sensitive": True},
            },
            {
                "kind": "python",
                "name": "sleepy",
                "target": "user_checks:sleepy",
                "rewards": ["sleepy", "sleepy_len"],
            },
            {"kind": "http", "name": "judge", "url": judge_url, "rewards": ["judge"], "attempts": 2},
        ]
    }
    (tmp / "verifiers.yaml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    args = ["--port", str(port), "--verifiers", str(tmp / "verifiers.yaml"), "--workers", "2", *SANDBOX_ARGS]
    env = {"PYTHONPATH": str(tmp), "REWARD_TEST_SECRET": SECRET}
    proc = ServiceProcess("services.reward", args, tmp / "log.txt", env=env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(proc, address, "distill.v1.RewardService")
        yield address, proc.proc.pid
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture
def service(served: tuple[str, int]) -> str:
    return served[0]


def verify(address: str, items: list[Item], timeout_s: float = 10.0) -> list[list[Reward]]:
    async def go() -> list[list[Reward]]:
        async with RewardClient(address, timeout_s=timeout_s) as client:
            return await client.verify(items)

    return asyncio.run(go())


def code(program: str) -> str:
    return f"Here:\n```python\n{program}\n```"


def test_info_lists_builtins_and_user_verifiers(service: str) -> None:
    async def go() -> dict[str, tuple[str, ...]]:
        async with RewardClient(service) as client:
            return {i.name: i.reward_names for i in await client.info()}

    names = asyncio.run(go())
    for builtin in ("exact_match", "math", "regex", "code", "length_penalty", "format"):
        assert builtin in names
    assert names["sleepy"] == ("sleepy", "sleepy_len") and names["judge"] == ("judge",)


def test_every_verifier_kind_through_the_service(service: str) -> None:
    tests = json.dumps([{"input": "3\n", "output": "9"}])
    items = [
        Item(
            "q", "Answer: Paris", {"answer": "paris", "pattern": "Par"}, ("exact_match", "exact_cs", "regex")
        ),
        Item("q", "so \\boxed{\\frac{2}{4}}", {"answer": "0.5"}, ("math", "format", "length_penalty")),
        Item("q", code("print(int(input()) ** 2)"), {"tests": tests}, ("code",)),
        Item("q", "a good answer", {}, ("sleepy", "judge")),
    ]
    got = [[(r.name, r.value, r.status) for r in rs] for rs in verify(service, items)]
    ok = Status.OK
    assert got[0] == [("exact_match", 1.0, ok), ("exact_cs", 0.0, ok), ("regex", 1.0, ok)]
    assert got[1] == [("math", 1.0, ok), ("format", 1.0, ok), ("length_penalty", 0.0, ok)]
    assert got[2] == [("code", 1.0, ok)]
    assert got[3] == [("sleepy", 1.0, ok), ("sleepy_len", 13.0, ok), ("judge", 0.25, ok)]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "items: the batch is empty"),
        ([Item("q", "r", {"answer": "1"}, ("math", "maths", "regexx"))],
         r"unknown verifier\(s\) \['maths', 'regexx'\]"),
        ([Item("q", "r", {"answer": "1"}, ("math",)), Item("q", "r", {}, ("regex",))],
         r"items\[1\].reference is missing \['pattern'\]"),
        ([Item("q", "r", {}, ("code",))], r"missing \['tests \(or test_code\)'\]"),
    ],
)  # fmt: skip
def test_invalid_requests_name_the_field(service: str, items: list[Item], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        verify(service, items)


def test_raw_invalid_argument_status(service: str) -> None:
    with grpc.insecure_channel(service) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        request = pb.VerifyRequest(items=[pb.VerifyItem(prompt="q", response="r", verifiers=["nope"])])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Verify(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in caught.value.details()


def test_hostile_programs_are_contained_and_the_service_stays_healthy(
    served: tuple[str, int], tmp_path: Path
) -> None:
    service, pid = served
    snoop = (
        f"import os\nseen = str(os.environ)\nfor p in ({pid}, os.getppid(), 1):\n"
        "    try: seen += open(f'/proc/{p}/environ').read()\n    except OSError: pass\n"
        f"assert {SECRET!r} in seen"
    )
    tmp_path.chmod(0o777)
    outside = tmp_path / "escaped"
    ref = {"test_code": "pass"}
    port = int(service.split(":")[1])
    either = {Status.ERROR, Status.TIMEOUT}  # side by side on 2 cores, a time limit may come first
    hostile = {
        "loop": (code("while True: pass"), {Status.TIMEOUT}),
        "fork": (code("import os\nwhile True:\n    os.fork()"), either),
        "memory": (code("hog = []\nwhile True:\n    hog.append(bytearray(10 << 20))"), either),
        "network": (code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"), None),
        "write": (code(f"open({str(outside)!r}, 'w').write('x')"), None),
        "environ": (code(snoop), None),
    }
    items = [Item("q", prog, ref, ("code",)) for prog, _ in hostile.values()]
    start = time.monotonic()
    results = verify(service, items, timeout_s=15.0)
    assert time.monotonic() - start < 12.0
    for (name, (_, want)), (reward,) in zip(hostile.items(), results, strict=True):
        if want is None:  # the attempt raised inside the sandbox: a failed test, reward 0
            assert reward.status is Status.OK and reward.value == 0.0, (name, reward)
        else:
            assert reward.status in want and math.isnan(reward.value), (name, reward)
    assert not outside.exists()
    assert health_status(service, "distill.v1.RewardService") == "SERVING"
    ((after,),) = verify(service, [Item("q", code("x = 1"), {"test_code": "assert x == 1"}, ("code",))])
    assert after.status is Status.OK and after.value == 1.0


def test_slow_item_does_not_hold_the_batch(service: str) -> None:
    items = [Item("q", "r", {"sleep": "30"}, ("sleepy",))] + [
        Item("q", "Answer: 2", {"answer": "2"}, ("math",))
    ] * 8
    start = time.monotonic()
    results = verify(service, items, timeout_s=1.5)
    assert time.monotonic() - start < 4.0
    assert [r.status for r in results[0]] == [Status.TIMEOUT, Status.TIMEOUT]
    assert all(rs[0].status is Status.OK and rs[0].value == 1.0 for rs in results[1:])


def test_call_deadline_bounds_the_batch(service: str) -> None:
    with grpc.insecure_channel(service) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        item = pb.VerifyItem(prompt="q", response="r", reference={"sleep": "30"}, verifiers=["sleepy"])
        start = time.monotonic()
        # No timeout_s: the call's deadline rules, and a reply (not DEADLINE_EXCEEDED) comes back in it.
        reply = stub.Verify(pb.VerifyRequest(items=[item]), timeout=1.0)
    assert time.monotonic() - start < 1.5
    assert reply.results[0].rewards[0].status == pb.REWARD_STATUS_TIMEOUT


def test_reflection_lists_the_service(service: str) -> None:
    with grpc.insecure_channel(service) as channel:
        names = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "distill.v1.RewardService" in names and "grpc.health.v1.Health" in names


def test_token_tls_and_graceful_stop(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    args = [
        "--port",
        str(port),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--workers",
        "1",
        "--grace-s",
        "5",
    ]
    proc = ServiceProcess(
        "services.reward", args, tmp_path / "log.txt", env={"DISTILL_REWARD_TOKEN": "s3cret"}
    )
    address = f"localhost:{port}"
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    request = pb.VerifyRequest(
        items=[pb.VerifyItem(response="Answer: 1", reference={"answer": "1"}, verifiers=["math"])]
    )
    try:
        _wait_tls(proc, address, creds)
        with grpc.secure_channel(address, creds) as channel:
            stub = pb_grpc.RewardServiceStub(channel)
            for metadata in ((), bearer_metadata("wrong")):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Verify(request, timeout=5, metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Verify(request, timeout=10, metadata=bearer_metadata("s3cret"))
            assert reply.results[0].rewards[0].status == pb.REWARD_STATUS_OK
        with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):  # no plaintext on TLS
            pb_grpc.RewardServiceStub(plain).Info(pb.RewardInfoRequest(), timeout=2)
        _sigterm_drains_in_flight_calls(proc, address, creds)
    finally:
        proc.stop()


def _sigterm_drains_in_flight_calls(
    proc: ServiceProcess, address: str, creds: grpc.ChannelCredentials
) -> None:
    """SIGTERM while a call runs: the call still completes within the grace period, exit 0."""
    slow = pb.VerifyItem(response=code("import time\ntime.sleep(1.5)"), reference={"test_code": "pass"},
                         verifiers=["code"])  # fmt: skip
    replies: list[pb.VerifyReply] = []
    with grpc.secure_channel(address, creds) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        call = threading.Thread(
            target=lambda: replies.append(
                stub.Verify(pb.VerifyRequest(items=[slow]), timeout=20, metadata=bearer_metadata("s3cret"))
            )
        )
        call.start()
        time.sleep(0.5)
        proc.signal(signal.SIGTERM)
        call.join(20)
    assert replies and replies[0].results[0].rewards[0].status == pb.REWARD_STATUS_OK
    assert proc.proc.wait(15) == 0, proc.log()


def _wait_tls(proc: ServiceProcess, address: str, creds: grpc.ChannelCredentials) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()
        with grpc.secure_channel(address, creds) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(proc.log())
