"""Rollout queue benchmark: rollouts/s through XADD → XREADGROUP → XACK, ours vs raw redis-py.

Both paths run in one process against one embedded redis-server (AOF on, ``appendfsync
everysec``, the platform's default) on the same serialized records: a 128-token prompt and a
512-token response with the student's top-32 ids (int32) and one teacher's log-probs at them
(float16), about 100 kB per record.

- **raw**: pipelined XADD of the bytes, XREADGROUP COUNT 64, XACK, XTRIM; no decode.
- **ours**: ``RolloutProducer`` (lease script, then the group's atomic idempotent publish
  script, per prompt) and ``RolloutConsumer`` (whole groups, full decode and NaN/inf validation,
  applied-id bookkeeping, a real ``save_checkpoint`` of a tiny model before the ack, trim).

Rounds alternate between the paths and their order (memory stays bounded: each round is consumed
and trimmed); the median round is reported. Besides wall-clock rates it prints CPU seconds per
1,000 rollouts of this process and of redis-server (from /proc), which a machine shared with other
jobs distorts far less than wall time. Goal (issue 6): ours >= 2,000 rollouts/s on this machine.

    .venv/bin/python -m benchmarks.bench_queue                 # 2 x 5 rounds of 512 rollouts
    .venv/bin/python -m benchmarks.bench_queue --teacher-top-k 32  # also the teacher's own top-32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch

from contracts import keys
from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from contracts.rollout_record import Reward, TeacherArrays, build_rollout
from learner.checkpoint import Checkpoint, save_checkpoint
from learner.queue import ConsumerConfig, RolloutConsumer
from proto.distill.v1 import reward_pb2, rollout_pb2
from services.rollout.queue import ProducerConfig, PromptLease, RolloutProducer


def _distinct_ids(rng: np.random.Generator, positions: int, k: int, vocab: int = 32000) -> np.ndarray:
    """(positions, k) ids, distinct within a position as a real top-K is (the record checks it)."""
    start = rng.integers(0, vocab, (positions, 1))
    return ((start + np.arange(k) * (vocab // k)) % vocab).astype(np.int32)


def make_group(
    run_id: str, lease: PromptLease, k: int, args: argparse.Namespace
) -> list[rollout_pb2.Rollout]:
    rng = np.random.default_rng(lease.prompt_id)
    p, top = args.response, args.top_k
    out = []
    for g in range(k):
        t_top = args.teacher_top_k
        teacher = TeacherArrays(
            teacher="t0",
            token_logprobs=-rng.random(p, dtype=np.float32),
            top_ids=rng.integers(0, 32000, (p, t_top), dtype=np.int32),
            top_logprobs=-rng.random((p, t_top), dtype=np.float32),
            candidate_logprobs=-rng.random((p, top), dtype=np.float32),
        )
        out.append(build_rollout(
            run_id=run_id, prompt_id=lease.prompt_id, group_index=g, group_size=k, attempt=lease.attempt,
            dataset_index=lease.dataset_index, policy_version=0,
            token_ids=rng.integers(0, 32000, args.prompt + p, dtype=np.int32), response_start=args.prompt,
            sampled_logprobs=-rng.random(p, dtype=np.float32),
            student_top_ids=_distinct_ids(rng, p, top), teachers=[teacher],
            rewards=[Reward("exact_match", 1.0, reward_pb2.REWARD_STATUS_OK)],
        ))  # fmt: skip
    return out


class CpuClock:
    """CPU seconds used so far by this process and by the redis-server child."""

    def __init__(self, server_pid: int) -> None:
        self.stat = Path(f"/proc/{server_pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK")

    def now(self) -> tuple[float, float]:
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return time.process_time(), (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime


Phase = tuple[float, float, float]  # wall s, client CPU s, server CPU s


def _phase(clock: CpuClock, t0: float, c0: tuple[float, float]) -> Phase:
    c1 = clock.now()
    return time.perf_counter() - t0, c1[0] - c0[0], c1[1] - c0[1]


def raw_round(
    client: redis.Redis, stream: str, payloads: list[bytes], clock: CpuClock
) -> tuple[Phase, Phase]:
    """Pipelined XADD, then XREADGROUP/XACK until everything is consumed."""
    t0, c0 = time.perf_counter(), clock.now()
    for i in range(0, len(payloads), 64):
        pipe = client.pipeline(transaction=False)
        for data in payloads[i : i + 64]:
            pipe.xadd(stream, {b"data": data})
        pipe.execute()
    produce = _phase(clock, t0, c0)
    t0, c0 = time.perf_counter(), clock.now()
    got: list[Any] = []
    while len(got) < len(payloads):
        reply: Any = client.xreadgroup("g", "c", {stream: ">"}, count=64, block=100)
        ids = [e for e, _ in reply[0][1]]
        client.xack(stream, "g", *ids)
        got += ids
    client.xtrim(stream, minid=got[-1], approximate=False)
    return produce, _phase(clock, t0, c0)


async def publish_all(producer: RolloutProducer, groups: list[list[rollout_pb2.Rollout]]) -> None:
    for records in groups:
        lease = await producer.lease()
        assert lease is not None and lease.prompt_id == records[0].prompt_id
        await producer.publish(lease, records)


def ours_round(
    producer: RolloutProducer, consumer: RolloutConsumer, groups: list[list[rollout_pb2.Rollout]],
    ckpt_dir: Path, args: argparse.Namespace, clock: CpuClock,
) -> tuple[Phase, Phase, float]:  # fmt: skip
    """Lease + publish every group, then consume them step by step (+ checkpoint wall seconds)."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t0, c0 = time.perf_counter(), clock.now()
    asyncio.get_event_loop().run_until_complete(publish_all(producer, groups))
    produce = _phase(clock, t0, c0)
    t0, c0 = time.perf_counter(), clock.now()
    steps = len(groups) // args.groups_per_step
    ckpt_s = 0.0
    for step in range(1, steps + 1):
        batch = consumer.next_batch(args.groups_per_step, policy_version=0, timeout_s=10)
        assert len(batch.groups) == args.groups_per_step
        consumer.mark_applied(batch)
        if step % args.checkpoint_every == 0 or step == steps:
            w0 = time.perf_counter()
            save_checkpoint(ckpt_dir, Checkpoint(step, model.state_dict(), opt.state_dict(),
                                                 applied=consumer.applied.to_state()))  # fmt: skip
            ckpt_s += time.perf_counter() - w0
            consumer.ack_applied()
            consumer.trim()
    return produce, _phase(clock, t0, c0), ckpt_s


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rollouts", type=int, default=512, help="rollouts per round")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--teacher-top-k", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=8, help="steps between checkpoint + ack + trim")
    return p.parse_args()


def main() -> None:
    args = parse()
    n_groups = args.rollouts // args.group_size
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", appendfsync="everysec").start()
        try:
            run(args, server, Path(tmp), n_groups)
        finally:
            server.stop()


def report(n: int, raw: list[tuple[Phase, Phase]], ours: list[tuple[Phase, Phase, float]]) -> None:
    def med(runs: list[Any], phase: int, i: int) -> float:
        return statistics.median(r[phase][i] for r in runs)

    print(f"{'median round':27s} {'raw':>7s} {'ours':>7s} {'ours/raw':>8s}   CPU s per 1000: client, redis")
    for name, phase in (("produce, rollouts/s", 0), ("consume, rollouts/s", 1)):
        a, b = n / med(raw, phase, 0), n / med(ours, phase, 0)
        cpu = [f"{1000 * med(x, phase, i) / n:.3f}" for x in (raw, ours) for i in (1, 2)]
        print(f"{name:27s} {a:7.0f} {b:7.0f} {b / a:8.2f}   raw {cpu[0]}, {cpu[1]}; ours {cpu[2]}, {cpu[3]}")
    a = n / statistics.median(r[0][0] + r[1][0] for r in raw)
    b = n / statistics.median(r[0][0] + r[1][0] for r in ours)
    print(f"{'end to end, one thread':27s} {a:7.0f} {b:7.0f} {b / a:8.2f}")
    ckpt = statistics.median(r[2] for r in ours)
    print(f"ours' checkpoint writes (fsync): {ckpt * 1e3:.0f} ms per round of {n}")
    print(f"ours, producer and learner as separate processes (slower side): "
          f"{n / max(med(ours, 0, 0), med(ours, 1, 0)):.0f} rollouts/s; goal 2000")  # fmt: skip


def run(args: argparse.Namespace, server: EmbeddedRedis, tmp: Path, n_groups: int) -> None:
    client = make_client(server.url)
    client.xgroup_create("raw", "g", id="0", mkstream=True)
    run_id = "bench"
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    producer = RolloutProducer(make_async_client(server.url), ProducerConfig(
        run_id, group_size=args.group_size, groups_per_step=args.groups_per_step, max_staleness=10**9,
        dataset_size=10**6,
    ))  # fmt: skip
    consumer = RolloutConsumer(client, ConsumerConfig(run_id, "learner", max_staleness=10**9, read_count=64))
    assert server.pid is not None
    clock = CpuClock(server.pid)
    size = len(make_group(run_id, PromptLease(0, 1, 0), 1, args)[0].SerializeToString())
    print(f"record: {size / 1024:.1f} kB, {args.rollouts} rollouts per round, K={args.group_size}, "
          f"{args.groups_per_step} groups per step, checkpoint + ack every {args.checkpoint_every} steps; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    raw: list[tuple[Phase, Phase]] = []
    ours: list[tuple[Phase, Phase, float]] = []
    for r in range(args.rounds):
        groups = [make_group(run_id, PromptLease(r * n_groups + i, 1, 0), args.group_size, args)
                  for i in range(n_groups)]  # fmt: skip
        payloads = [rec.SerializeToString() for g in groups for rec in g]
        if r % 2:  # alternate the order so AOF flushes of one path do not always land on the other
            ours.append(ours_round(producer, consumer, groups, tmp / "ckpt", args, clock))
            raw.append(raw_round(client, "raw", payloads, clock))
        else:
            raw.append(raw_round(client, "raw", payloads, clock))
            ours.append(ours_round(producer, consumer, groups, tmp / "ckpt", args, clock))
    report(n_groups * args.group_size, raw, ours)
    print(f"redis used_memory at end: {client.info('memory')['used_memory'] / 2**20:.1f} MiB, "
          f"stream length {client.xlen(keys.rollout_stream(run_id))}")  # fmt: skip
    loop.run_until_complete(producer.client.aclose())
    loop.close()


if __name__ == "__main__":
    main()
