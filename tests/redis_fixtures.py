"""Helpers for the queue tests: real redis-server processes and synthetic (random) rollout groups.

Each test gets its own ``redis-server`` on a free loopback port with AOF ``appendfsync always``
(never the machine's server on 6379). Records are random arrays of realistic shapes, built with
the production builder (``contracts.rollout_record.build_rollout``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import redis
import redis.asyncio

from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from contracts.rollout_record import Reward, TeacherArrays, build_rollout
from proto.distill.v1 import reward_pb2, rollout_pb2
from services.rollout.queue import ProducerConfig, PromptLease, RolloutProducer


@contextmanager
def embedded(data_dir: Path, appendfsync: str = "always") -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(data_dir, appendfsync=appendfsync).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def _distinct_ids(rng: np.random.Generator, vocab: int, positions: int, k: int) -> np.ndarray:
    """(positions, k) int32 ids, distinct within each position, as a real top-K is."""
    return np.stack([rng.choice(vocab, k, replace=False) for _ in range(positions)]).astype(np.int32)


def synthetic_group(
    run_id: str, lease: PromptLease, group_size: int, *, tokens: int = 12, top_k: int = 4,
    policy_version: int = 0, seed: int = 0, vocab: int = 100,
) -> list[rollout_pb2.Rollout]:  # fmt: skip
    """The K records of one leased prompt: random ids and log-probs, one teacher, one OK reward."""
    rng = np.random.default_rng(seed + 7919 * lease.prompt_id + lease.attempt)
    start = max(1, tokens // 4)
    p = tokens - start
    out = []
    for g in range(group_size):
        teacher = TeacherArrays(
            teacher="t0",
            token_logprobs=-rng.random(p, dtype=np.float32),
            top_ids=_distinct_ids(rng, vocab, p, top_k),
            top_logprobs=-rng.random((p, top_k), dtype=np.float32),
            candidate_logprobs=-rng.random((p, top_k), dtype=np.float32),
        )
        out.append(build_rollout(
            run_id=run_id, prompt_id=lease.prompt_id, group_index=g, group_size=group_size,
            attempt=lease.attempt, dataset_index=lease.dataset_index, policy_version=policy_version,
            token_ids=rng.integers(0, vocab, tokens, dtype=np.int32), response_start=start,
            sampled_logprobs=-rng.random(p, dtype=np.float32),
            student_top_ids=_distinct_ids(rng, vocab, p, top_k),
            teachers=[teacher],
            rewards=[Reward("exact_match", float(g % 2), reward_pb2.REWARD_STATUS_OK)],
        ))  # fmt: skip
    return out


async def produce_groups(
    url: str, run_id: str, num_groups: int, group_size: int, *, max_staleness: int = 1000,
    policy_version: int = 0, pause_s: float = 0.0,
) -> list[str]:  # fmt: skip
    """Lease and publish ``num_groups`` groups; returns the rollout ids (the producer ledger)."""
    client = make_async_client(url)
    cfg = ProducerConfig(run_id, group_size=group_size, groups_per_step=1, max_staleness=max_staleness,
                         dataset_size=1000, total_prompts=num_groups)  # fmt: skip
    producer = RolloutProducer(client, cfg)
    ids: list[str] = []
    try:
        while (lease := await producer.lease()) is not None:
            records = synthetic_group(run_id, lease, group_size, policy_version=policy_version)
            await producer.publish(lease, records)
            ids += [r.rollout_id for r in records]
            await asyncio.sleep(pause_s)
    finally:
        await client.aclose()
    return ids


def produce(url: str, run_id: str, num_groups: int, group_size: int, *, policy_version: int = 0,
            pause_s: float = 0.0) -> list[str]:  # fmt: skip
    return asyncio.run(
        produce_groups(url, run_id, num_groups, group_size, policy_version=policy_version, pause_s=pause_s)
    )


def sync_client(server: EmbeddedRedis) -> redis.Redis:
    return make_client(server.url)


class DroppingProxy:
    """A loopback TCP proxy to Redis that, when armed, forwards one request containing ``marker``
    and then closes the connection before the reply reaches the client (a reply lost in transit).
    """

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.armed = False
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"drop": False}
            threading.Thread(target=self._to_server, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client, state), daemon=True).start()

    def _to_server(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        tail = b""  # the end of the previous chunk, so a marker split across reads is still seen
        try:
            while data := src.recv(65536):
                seen, tail = tail + data, data[-len(self.marker) :]
                if self.armed and self.marker in seen:
                    self.armed = False
                    self.dropped += 1
                    state["drop"] = True  # the reply to this request never reaches the client
                dst.sendall(data)
        except OSError:
            return

    def _to_client(self, src: socket.socket, dst: socket.socket, state: dict[str, bool]) -> None:
        try:
            while (data := src.recv(65536)) and not state["drop"]:
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()
