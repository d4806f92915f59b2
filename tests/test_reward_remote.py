"""Remote verifier adapters against real servers on loopback (RELIABILITY items 22 and 23).

HTTP: a real stdlib HTTP server in a thread. gRPC: a real ``grpc.aio`` server serving this
same proto (one healthy, one that answers UNAVAILABLE a set number of times).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from grpc import aio

from proto.distill.v1 import reward_pb2 as pb
from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.client import RewardClient
from services.reward.domain import Item, Reward, Status, VerifierInfo
from services.reward.engine import RewardEngine
from services.reward.remote import GrpcVerifier, HttpVerifier, RemotePolicy
from services.reward.servicer import SERVICE_NAME, RewardServicer
from services.reward.verifiers.base import Verifier
from services.reward.verifiers.registry import Runtime, VerifierSet, build_builtin
from services.rpc.client import RetryPolicy
from services.rpc.server import RunningServer, ServerOptions, ServiceSpec, start
from tests.procs import free_port

POLICY = RemotePolicy(attempt_timeout_s=2.0, attempts=3, backoff_s=0.01, max_concurrency=4)


class JudgeState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0


def _handler(state: JudgeState) -> type[BaseHTTPRequestHandler]:
    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            return

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with _InFlight(state, self.path) as n:  # n: how many calls this path has had
                if self.path == "/slow":
                    time.sleep(0.1)
            score = {"rewards": {"judge": float(len(body["response"]))}, "detail": body["verifier"]}
            behaviour = {
                "/ok": (200, score),
                "/slow": (200, score),
                "/flaky": (503, {}) if n <= 2 else (200, score),
                "/down": (503, {}),
                "/refuse": (422, {"error": "bad item"}),
                "/garbled": (200, None),
            }[self.path]
            code, payload = behaviour
            self._reply(code, b"{{not json" if payload is None else json.dumps(payload).encode())

    return Judge


class _InFlight:
    """Counts calls per path and the most requests the judge ever held at once."""

    def __init__(self, state: JudgeState, path: str) -> None:
        self.state, self.path = state, path

    def __enter__(self) -> int:
        with self.state.lock:
            self.state.calls[self.path] += 1
            self.state.in_flight += 1
            self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
            return self.state.calls[self.path]

    def __exit__(self, *exc: object) -> None:
        with self.state.lock:
            self.state.in_flight -= 1


@pytest.fixture
def judge() -> Iterator[tuple[str, JudgeState]]:
    state = JudgeState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def _info(name: str) -> VerifierInfo:
    return VerifierInfo(name, "http", ("judge",))


async def _verify(verifier: Verifier, n: int = 1) -> list[Reward]:
    engine = RewardEngine(VerifierSet([verifier]), default_timeout_s=20.0)
    try:
        results = await engine.verify([Item("p", "resp" + "x" * i, {}, (verifier.name,)) for i in range(n)])
    finally:
        await verifier.close()
    return [r for rs in results for r in rs]


async def test_http_ok(judge: tuple[str, JudgeState]) -> None:
    url, _ = judge
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, url + "/ok", POLICY))
    assert reward.status is Status.OK and reward.value == 4.0 and reward.detail == "j"


async def test_http_5xx_is_retried_then_succeeds(judge: tuple[str, JudgeState]) -> None:
    url, state = judge
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, url + "/flaky", POLICY))
    assert reward.status is Status.OK and state.calls["/flaky"] == 3


async def test_http_repeated_5xx_is_unavailable_after_bounded_tries(judge: tuple[str, JudgeState]) -> None:
    url, state = judge
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, url + "/down", POLICY))
    assert reward.status is Status.UNAVAILABLE and math.isnan(reward.value)
    assert state.calls["/down"] == POLICY.attempts and "503" in reward.detail


async def test_http_4xx_is_not_retried(judge: tuple[str, JudgeState]) -> None:
    url, state = judge
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, url + "/refuse", POLICY))
    assert reward.status is Status.ERROR and "422" in reward.detail and state.calls["/refuse"] == 1


async def test_http_garbled_reply_is_an_error(judge: tuple[str, JudgeState]) -> None:
    url, _ = judge
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, url + "/garbled", POLICY))
    assert reward.status is Status.ERROR and "malformed" in reward.detail


async def test_http_connection_refused_is_unavailable() -> None:
    (reward,) = await _verify(HttpVerifier(_info("j"), 10.0, f"http://127.0.0.1:{free_port()}/x", POLICY))
    assert reward.status is Status.UNAVAILABLE


async def test_http_concurrency_limit_holds_under_a_10x_burst(judge: tuple[str, JudgeState]) -> None:
    url, state = judge
    rewards = await _verify(
        HttpVerifier(_info("j"), 30.0, url + "/slow", POLICY), n=10 * POLICY.max_concurrency
    )
    assert all(r.status is Status.OK for r in rewards)
    assert 2 <= state.max_in_flight <= POLICY.max_concurrency


class FlakyServicer(RewardServicer):
    """Answers UNAVAILABLE for the first ``failures`` calls, then serves normally."""

    def __init__(self, engine: RewardEngine, failures: int) -> None:
        super().__init__(engine)
        self.failures, self.calls = failures, 0

    async def Verify(self, request: pb.VerifyRequest, context: aio.ServicerContext) -> pb.VerifyReply:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return await super().Verify(request, context)


@pytest.fixture
async def remote() -> AsyncIterator[tuple[str, FlakyServicer, RunningServer]]:
    from services.reward.pool import WorkerPool

    pool = WorkerPool(1)  # the exact_match built-in runs inline: the pool is never used
    engine = RewardEngine(
        VerifierSet([build_builtin("exact_match", "exact_match", {}, 5.0, Runtime(pool, None))])
    )
    servicer = FlakyServicer(engine, failures=0)
    spec = ServiceSpec(SERVICE_NAME, lambda s: pb_grpc.add_RewardServiceServicer_to_server(servicer, s))
    running = await start([spec], ServerOptions(port=0))
    await running.set_serving(True)
    yield f"127.0.0.1:{running.port}", servicer, running
    await running.stop(0.5)


def _grpc(address: str, remote_name: str = "exact_match") -> GrpcVerifier:
    info = VerifierInfo("far", "grpc", ("exact_match",))
    return GrpcVerifier(info, 10.0, address, remote_name, POLICY)


async def _grpc_verify(verifier: GrpcVerifier, response: str = "Answer: 7") -> Reward:
    engine = RewardEngine(VerifierSet([verifier]))
    try:
        ((reward,),) = await engine.verify([Item("p", response, {"answer": "7"}, ("far",))])
    finally:
        await verifier.close()
    return reward


async def test_grpc_remote_ok_and_retries(remote: tuple[str, FlakyServicer, RunningServer]) -> None:
    address, servicer, _ = remote
    servicer.failures = 2
    reward = await _grpc_verify(_grpc(address))
    assert reward.status is Status.OK and reward.value == 1.0 and servicer.calls == 3


async def test_grpc_remote_unavailable_after_bounded_tries(
    remote: tuple[str, FlakyServicer, RunningServer],
) -> None:
    address, servicer, _ = remote
    servicer.failures = 100
    reward = await _grpc_verify(_grpc(address))
    assert reward.status is Status.UNAVAILABLE and servicer.calls == POLICY.attempts


async def test_grpc_remote_invalid_argument_is_not_retried(
    remote: tuple[str, FlakyServicer, RunningServer],
) -> None:
    address, servicer, _ = remote
    reward = await _grpc_verify(_grpc(address, remote_name="no_such"))
    assert reward.status is Status.ERROR and "INVALID_ARGUMENT" in reward.detail and servicer.calls == 1


async def test_grpc_remote_nothing_listening_is_unavailable() -> None:
    reward = await _grpc_verify(_grpc(f"127.0.0.1:{free_port()}"))
    assert reward.status is Status.UNAVAILABLE


async def test_client_retries_unavailable(remote: tuple[str, FlakyServicer, RunningServer]) -> None:
    address, servicer, _ = remote
    servicer.failures = 2
    async with RewardClient(
        address, timeout_s=5.0, retry=RetryPolicy(attempts=4, initial_backoff_s=0.01)
    ) as c:
        ((reward,),) = await c.verify([Item("p", "Answer: 7", {"answer": "7"}, ("exact_match",))])
    assert reward.status is Status.OK and servicer.calls == 3


async def test_client_gives_up_after_its_retry_budget(
    remote: tuple[str, FlakyServicer, RunningServer],
) -> None:
    address, servicer, _ = remote
    servicer.failures = 100
    async with RewardClient(
        address, timeout_s=5.0, retry=RetryPolicy(attempts=2, initial_backoff_s=0.01)
    ) as c:
        with pytest.raises(aio.AioRpcError) as caught:
            await c.verify([Item("p", "Answer: 7", {"answer": "7"}, ("exact_match",))])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 2
