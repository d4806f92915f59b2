"""Lifecycle, transport and security of the teacher service, against real server processes.

RELIABILITY items: 13 (health NOT_SERVING → SERVING → NOT_SERVING on SIGTERM, graceful stop that
finishes the in-flight call, client moves to another replica), 14 (a stalled server — SIGSTOP —
gives DEADLINE_EXCEEDED, not a hang), 15 (batches over 4 MB and over the server's limit are split;
an impossible one gets RESOURCE_EXHAUSTED), 16 (missing/wrong token → UNAUTHENTICATED; TLS refuses
plaintext).

Run: ``.venv/bin/pytest tests/test_teacher_lifecycle.py -q``
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.distill.v1 import teacher_pb2, teacher_pb2_grpc
from services.rpc.auth import bearer_metadata
from services.rpc.client import RetryPolicy, open_channel
from services.teacher.client import TeacherClient, make_item, score_all, split_by_bytes
from services.teacher.domain import ScoreItem, ScoreParams
from services.teacher.tiny_model import TinySpec, build_tiny_model
from services.teacher.wire import decode_reply, encode_request
from tests.procs import ServiceProcess, free_port, health_status, self_signed_cert, wait_serving

pytestmark = pytest.mark.integration
SERVICE = "distill.v1.TeacherScoring"
VOCAB, MAX_LEN = 512, 256
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


@dataclass
class Server:
    address: str
    proc: ServiceProcess


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=VOCAB, hidden_size=128, num_layers=4, max_length=MAX_LEN)
    return build_tiny_model(tmp_path_factory.mktemp("teacher"), spec)


def _spawn(model_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    args = ["--model", str(model_dir), "--port", str(port), "--device", "cpu", *extra]
    proc = ServiceProcess("services.teacher", args, log)
    return Server(f"127.0.0.1:{port}", proc)


@pytest.fixture(scope="module")
def plain(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _spawn(model_dir, tmp_path_factory.mktemp("logs") / "plain.log", "--grace-s", "2")
    try:
        wait_serving(server.proc, server.address, SERVICE)
        yield server
    finally:
        os.kill(server.proc.proc.pid, signal.SIGCONT)  # in case a test left it stopped
        assert server.proc.stop() == 0, server.proc.log()


@pytest.fixture(scope="module")
def secured(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """TLS, a bearer token (from the environment) and a 0.75 MB message limit."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    port = free_port()
    args = [
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--max-message-mb",
        "0.75",
        "--grace-s",
        "2",
    ]
    log = tmp_path_factory.mktemp("logs") / "secured.log"
    proc = ServiceProcess("services.teacher", args, log, env={"DISTILL_TEACHER_TOKEN": "s3cret"})
    server = Server(f"localhost:{port}", proc)
    try:
        _wait_tls_serving(server, cert)
        yield server, cert
    finally:
        assert proc.stop() == 0, proc.log()


def _wait_tls_serving(server: Server, cert: Path, timeout: float = 60.0) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(server.address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert server.proc.proc.poll() is None, server.proc.log()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(server.proc.log())


def _items(n: int, length: int = MAX_LEN, candidates: int = 0, seed: int = 0) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    return [
        make_item(
            rng.integers(0, VOCAB, length),
            1,
            rng.integers(0, VOCAB, (length - 1, candidates)) if candidates else None,
        )
        for _ in range(n)
    ]


# --- 13: health and graceful stop -------------------------------------------------------------
async def _watch_until(address: str, wanted: int, seen: list[str]) -> None:
    async with aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        async for reply in stream:
            seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            if reply.status == wanted:
                stream.cancel()
                return


async def test_health_transitions_and_graceful_stop_mid_request(model_dir: Path, tmp_path: Path) -> None:
    server = _spawn(model_dir, tmp_path / "graceful.log", "--grace-s", "30", "--log-level", "debug")
    try:
        seen: list[str] = []
        while not seen or seen[-1] != "SERVING":  # from start-up until the model is loaded
            assert server.proc.proc.poll() is None, server.proc.log()
            status = health_status(server.address, SERVICE, timeout=0.5)
            if not seen or seen[-1] != status:
                seen.append(status)
            await asyncio.sleep(0.02)
        assert "NOT_SERVING" in seen and seen.index("NOT_SERVING") < seen.index("SERVING"), seen

        watched: list[str] = []
        watcher = asyncio.create_task(
            _watch_until(server.address, health_pb2.HealthCheckResponse.NOT_SERVING, watched)
        )
        items = _items(64, seed=1)  # 16k tokens: ~0.5 s of forward passes, SIGTERM comes within ms
        async with TeacherClient([server.address], deadline_s=60, retry=RetryPolicy(attempts=1)) as client:
            call = asyncio.create_task(client.score(items, top_k=1))
            while "scoring 64 sequences" not in server.proc.log():  # the server's handler has it
                assert not call.done(), call
                await asyncio.sleep(0.01)
            assert not call.done(), "the request finished before SIGTERM: make it longer"
            sigterm_at = time.monotonic()
            server.proc.signal(signal.SIGTERM)
            await asyncio.wait_for(watcher, 10)
            scores = await call  # the in-flight call is finished, not cut off
            done_at = time.monotonic()
        assert watched[0] == "SERVING" and watched[-1] == "NOT_SERVING", watched
        assert len(scores) == 64 and all(s.token_logprobs.shape == (MAX_LEN - 1,) for s in scores)
        assert done_at > sigterm_at
        assert await asyncio.to_thread(server.proc.proc.wait, 30) == 0
        assert health_status(server.address, SERVICE) == "UNREACHABLE"
    finally:
        server.proc.stop()


def test_a_model_that_cannot_load_ends_the_process_with_its_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = _spawn(missing, tmp_path / "missing.log")
    code = server.proc.proc.wait(120)
    server.proc.stop()
    assert code != 0
    assert str(missing) in server.proc.log()


async def test_client_moves_to_another_replica(plain: Server) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: UNAVAILABLE
    async with TeacherClient([dead, plain.address], deadline_s=10, retry=FAST_RETRY) as client:
        for _ in range(4):  # every other call starts at the dead replica and retries on the live one
            (scores,) = await client.score(_items(1, length=8), top_k=2)
            assert scores.top_ids.shape == (7, 2)
    async with TeacherClient([dead], deadline_s=10, retry=FAST_RETRY) as client:
        with pytest.raises(aio.AioRpcError) as err:
            await client.info()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_score_all_asks_several_teachers_at_once(plain: Server, secured: tuple[Server, Path]) -> None:
    server, cert = secured
    teachers = {
        "plain": TeacherClient([plain.address], deadline_s=30),
        "secured": TeacherClient([server.address], token="s3cret", tls_ca=cert, deadline_s=30),
    }
    try:
        items = _items(3, length=40, seed=5)
        results = await score_all(teachers, items, top_k=4)
    finally:
        await asyncio.gather(*(t.close() for t in teachers.values()))
    assert set(results) == {"plain", "secured"}
    for a, b in zip(results["plain"], results["secured"], strict=True):  # same weights behind both
        assert np.array_equal(a.top_ids, b.top_ids)
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-6)


# --- 14: stalled server -----------------------------------------------------------------------
async def test_stalled_teacher_gives_deadline_exceeded(plain: Server) -> None:
    os.kill(plain.proc.proc.pid, signal.SIGSTOP)
    try:
        async with TeacherClient([plain.address], deadline_s=1.0) as client:
            started = time.monotonic()
            with pytest.raises(aio.AioRpcError) as err:
                await client.score(_items(1, length=8), top_k=2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
    finally:
        os.kill(plain.proc.proc.pid, signal.SIGCONT)
    wait_serving(plain.proc, plain.address, SERVICE)
    async with TeacherClient([plain.address], deadline_s=10) as client:
        await client.score(_items(1, length=8), top_k=2)


# --- 15: message sizes ------------------------------------------------------------------------
async def test_batch_over_4mb_in_one_message_and_split_by_the_client(plain: Server) -> None:
    items = _items(10, candidates=VOCAB, seed=2)  # 255 × 512 int32 candidates each: > 5 MB (5e6 bytes) in all
    params = ScoreParams(top_k=8)
    request = encode_request(items, params, "float32")
    assert request.ByteSize() > 4 * 1024 * 1024
    channel = open_channel(plain.address)
    try:
        reply = await teacher_pb2_grpc.TeacherScoringStub(channel).Score(request, timeout=60)
    finally:
        await channel.close()
    assert reply.ByteSize() > 4 * 1024 * 1024
    whole = decode_reply(reply, items)
    assert len(split_by_bytes(items, 8, "float32", 3 * 1024 * 1024)) > 1
    async with TeacherClient([plain.address], deadline_s=60) as client:  # default 3 MB chunks
        split = await client.score(items, top_k=8)
    for a, b in zip(whole, split, strict=True):
        assert np.array_equal(a.candidate_logprobs, b.candidate_logprobs)
        assert np.array_equal(a.top_ids, b.top_ids)


async def test_over_the_server_limit_is_chunked_and_an_impossible_one_refused(
    secured: tuple[Server, Path],
) -> None:
    server, cert = secured
    items = _items(8, candidates=128, seed=3)  # ~1 MB request and reply: over the 0.75 MB limit
    async with TeacherClient(
        [server.address], token="s3cret", tls_ca=cert, deadline_s=30, chunk_bytes=256 * 1024
    ) as client:
        scores = await client.score(items, top_k=8)
        assert [s.candidate_logprobs.shape for s in scores] == [(MAX_LEN - 1, 128)] * 8
        huge = _items(1, candidates=VOCAB, seed=4)  # alone its reply (255 × 512 + top-256) is ~1 MB
        with pytest.raises(aio.AioRpcError) as err:
            await client.score(huge, top_k=256)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message limit of 786432" in (err.value.details() or ""), err.value.details()


# --- 16: auth and TLS -------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "wrong"])
async def test_missing_or_wrong_token_is_unauthenticated(
    secured: tuple[Server, Path], token: str | None
) -> None:
    server, cert = secured
    async with TeacherClient([server.address], token=token, tls_ca=cert, deadline_s=10) as client:
        with pytest.raises(aio.AioRpcError) as err:
            await client.info()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(aio.AioRpcError) as err:
            await client.score(_items(1, length=4), top_k=1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with TeacherClient([server.address], token="s3cret", tls_ca=cert, deadline_s=10) as client:
        assert (await client.info()).vocab_size == VOCAB


async def test_tls_server_refuses_plaintext(secured: tuple[Server, Path]) -> None:
    server, _ = secured
    async with aio.insecure_channel(server.address) as channel:
        stub = teacher_pb2_grpc.TeacherScoringStub(channel)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Info(teacher_pb2.InfoRequest(), timeout=3, metadata=bearer_metadata("s3cret"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
