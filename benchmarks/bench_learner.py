"""Learner benchmark (issue 6): step time through the real pipeline against a bare in-process loop.

Rollouts are waiting: before each timed run every step's prompt groups are already in the run's
stream, published by the real ``RolloutProducer`` (lease + atomic group publish) from records made
with ``build_rollout`` (random ids of a tiny student's vocabulary; a 32-token prompt, 64..128-token
responses, K responses per prompt, the student's top-k ids with one teacher's log-probs at them,
the teacher's own top-k, float16 on the wire, one reward). Then, on the same decoded batches:

- **pipeline**: the real ``learner.train.Learner`` built in-process and driven by its own ``run()``
  (Redis consumer group, decode and validation, objective, optimizer, weight publication to disk
  + Redis every step, checkpoint + ack + trim every ``checkpoint_interval`` steps, metrics stream),
  once with a checkpoint interval larger than the run and once with a small one;
- **bare**: ``pack_sequences`` → student forward (each prompt once, as the learner computes a
  Llama student: ``services.rollout.shared_prompt``) → ``objective_batch`` → ``objective_loss`` → backward
  → clip → optimizer step, no Redis, no checkpoint, no weight publication.

The Learner's methods are wrapped on the instance (instrumentation only; the code that runs is the
learner's) to split each step into reading/decoding (``_next_batch``), the training step
(``train_step``), weight publication, checkpoint, and the rest (metrics, ack bookkeeping, λ
boundary). The wait-for-data fraction is printed both from those timers and from the learner's own
``wait_fraction`` metrics. The batches the learner trained on are checked against the bare loop's.
The first ``--warmup`` steps of every run are left out; configurations are interleaved in rotating
order and the median step of each run is kept; the table gives the median (and best) over repeats.
Goal (issue 6): pipeline step time at most 1.10 x bare when rollouts are waiting.

``--read-count`` sets the consumer's entries per XREADGROUP. With its default (64) the consumer reads
several steps ahead; once the stream holds nothing unread, every further step spends the consumer's
XREADGROUP BLOCK (``block_ms``) waiting although whole groups are already buffered, which shows up in
the ``read`` column. ``--read-count`` = K x prompts-per-step reads one step at a time and isolates
the rest of the pipeline's overhead.

    .venv/bin/python -m benchmarks.bench_learner                  # ~1 min on 2 CPU cores
    .venv/bin/python -m benchmarks.bench_learner --repeats 5 --steps 12 --vocab 4096
    .venv/bin/python -m benchmarks.bench_learner --device cuda    # where a GPU is present
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from transformers import AutoModelForCausalLM

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_async_client, make_client
from contracts.rollout_record import DecodedRollout, Reward, TeacherArrays, build_rollout, decode_rollout
from contracts.runspec import RunSpec
from learner import run_state
from learner.batching import objective_batch, pack_sequences, rewards_matrix
from learner.objective import objective_loss
from learner.train import Learner, LearnerConfig, make_optimizer, objective_config
from proto.distill.v1 import reward_pb2, rollout_pb2
from services.rollout import shared_prompt
from services.rollout.queue import ProducerConfig, PromptLease, RolloutProducer
from services.teacher.tiny_model import TinySpec, build_tiny_model

PARTS = ("read", "step", "publish", "checkpoint", "other")
Batches = list[list[DecodedRollout]]  # per step, the rollouts in training order


# -- data ----------------------------------------------------------------------------------------


def distinct_ids(rng: np.random.Generator, p: int, k: int, vocab: int) -> np.ndarray:
    """(p, k) ids, distinct at each position (the decoder refuses a repeated support id)."""
    return (np.argpartition(rng.random((p, vocab - 4)), k, axis=1)[:, :k] + 4).astype(np.int32)


def make_group(run_id: str, lease: PromptLease, args: argparse.Namespace) -> list[rollout_pb2.Rollout]:
    """K records of one prompt; the content depends on the prompt id only, so runs see the same data."""
    rng = np.random.default_rng(lease.prompt_id)
    k, v, top = args.group_size, args.vocab, args.top_k
    out = []
    for g in range(k):
        p = int(rng.integers(args.response_min, args.response_max + 1))
        teacher = TeacherArrays(
            teacher="t0",
            token_logprobs=-4 * rng.random(p, dtype=np.float32),
            top_ids=distinct_ids(rng, p, top, v),
            top_logprobs=-4 * rng.random((p, top), dtype=np.float32),
            candidate_logprobs=-4 * rng.random((p, top), dtype=np.float32),
        )
        out.append(build_rollout(
            run_id=run_id, prompt_id=lease.prompt_id, group_index=g, group_size=k, attempt=lease.attempt,
            dataset_index=lease.dataset_index, policy_version=0,
            token_ids=rng.integers(4, v, args.prompt + p, dtype=np.int32), response_start=args.prompt,
            sampled_logprobs=-4 * rng.random(p, dtype=np.float32),
            student_top_ids=distinct_ids(rng, p, top, v), teachers=[teacher],
            rewards=[Reward("exact_match", float(rng.integers(0, 2)), reward_pb2.REWARD_STATUS_OK)],
        ))  # fmt: skip
    return out


async def produce(
    url: str, spec: RunSpec, run_id: str, args: argparse.Namespace
) -> list[list[rollout_pb2.Rollout]]:
    """Publish ``steps`` batches of whole groups to the run's stream; the groups in stream order."""
    client = make_async_client(url)
    cfg = ProducerConfig(
        run_id, group_size=spec.sampling.responses_per_prompt,
        groups_per_step=spec.sampling.prompts_per_step, max_staleness=spec.max_staleness,
        dataset_size=10**6, total_prompts=spec.steps * spec.sampling.prompts_per_step,
    )  # fmt: skip
    producer = RolloutProducer(client, cfg)
    groups = []
    try:
        while (lease := await producer.lease()) is not None:
            records = make_group(run_id, lease, args)
            await producer.publish(lease, records)
            groups.append(records)
    finally:
        await client.aclose()
    return groups


def decoded_batches(groups: list[list[rollout_pb2.Rollout]], per_step: int) -> Batches:
    flat = [[decode_rollout(r.SerializeToString()) for r in g] for g in groups]
    return [[r for g in flat[i : i + per_step] for r in g] for i in range(0, len(flat), per_step)]


def make_spec(args: argparse.Namespace, student: Path, interval: int) -> RunSpec:
    return RunSpec.model_validate({
        "student": str(student), "dataset": "unused.jsonl",
        "teachers": [{"name": "t0", "weight": 1.0}],
        "rewards": [{"name": "exact_match", "verifier": "exact_match",
                     "schedule": {"kind": "linear", "lambda0": 0.5, "alpha": 0.1}}],
        "objective": {"gamma": 0.5, "support": "student_top_k", "top_k": args.top_k,
                      "baseline": "leave_one_out"},
        "sampling": {"responses_per_prompt": args.group_size, "prompts_per_step": args.prompts_per_step,
                     "max_new_tokens": args.response_max},
        "optimizer": {"lr": 1e-4}, "steps": args.warmup + args.steps, "checkpoint_interval": interval,
        "max_staleness": 1000,  # pre-produced rollouts (policy version 0) must not go stale
    })  # fmt: skip


def create_run(client: redis.Redis, run_id: str, spec: RunSpec) -> None:
    """What POST /v1/runs leaves in Redis (as tests/training_stack.py does)."""
    now = time.time()
    state = rs.RunState(status=rs.RunStatus.QUEUED, desired=rs.Desired.RUN, step=0, created_at=now,
                        updated_at=now)  # fmt: skip
    client.set(rs.run_spec_key(run_id), spec.model_dump_json())
    client.hset(rs.run_state_key(run_id), mapping=state.to_hash())  # type: ignore[arg-type]


# -- pipeline ------------------------------------------------------------------------------------


class Probe:
    """Wall time of the learner's parts per step, from wrappers set on one Learner instance."""

    def __init__(self, learner: Learner) -> None:
        self.steps: list[dict[str, float]] = []
        self.boundary: list[float] = []
        self.trained_ids: list[list[str]] = []
        self._open: dict[str, float] | None = None
        self._wrap(learner, "_publish", "publish")  # the weights snapshot; the write runs in the background
        self._wrap(learner, "_checkpoint", "checkpoint")
        self._wrap(learner, "train_step", "step")
        self._wrap(learner, "_next_batch", "read")
        next_batch = learner._next_batch

        def recording_next_batch() -> Any:
            batch = next_batch()
            self.trained_ids.append([m.rollout.rollout_id for m in batch.rollouts])
            return batch

        learner._next_batch = recording_next_batch  # type: ignore[method-assign]
        boundary, one_step = learner._boundary, learner._one_step

        def timed_boundary() -> Any:
            t0 = time.perf_counter()
            out = boundary()
            self.boundary.append(time.perf_counter() - t0)
            return out

        def timed_one_step() -> None:
            self._open = defaultdict(float)
            t0 = time.perf_counter()
            one_step()
            self._open["total"] = time.perf_counter() - t0 + self.boundary[-1]
            self.steps.append(self._open)
            self._open = None

        learner._boundary = timed_boundary  # type: ignore[method-assign]
        learner._one_step = timed_one_step  # type: ignore[method-assign]

    def _wrap(self, learner: Learner, name: str, part: str) -> None:
        inner = getattr(learner, name)

        @functools.wraps(inner)
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                if self._open is not None:  # the start publication and the final checkpoint are not steps
                    self._open[part] += time.perf_counter() - t0

        setattr(learner, name, timed)

    def parts(self, warmup: int) -> list[dict[str, float]]:
        out = []
        for s in self.steps[warmup:]:
            known = sum(s[p] for p in PARTS if p != "other")
            out.append({**{p: s[p] for p in PARTS if p != "other"}, "other": s["total"] - known,
                        "total": s["total"]})  # fmt: skip
        return out


def run_pipeline(
    args: argparse.Namespace, client: redis.Redis, url: str, student: Path, interval: int, tag: str,
    tmp: Path,
) -> tuple[Probe, Batches, list[dict[str, float]]]:  # fmt: skip
    """One fresh run with every batch already waiting; the probe, the batches and the metrics stream."""
    run_id = f"bench-{tag}"
    spec = make_spec(args, student, interval)
    create_run(client, run_id, spec)
    groups = asyncio.run(produce(url, spec, run_id, args))
    batches = decoded_batches(groups, spec.sampling.prompts_per_step)  # fails fast on a bad record
    cfg = LearnerConfig(run_id=run_id, run_dir=tmp / run_id, consumer="learner", device=args.device)
    learner = Learner(cfg, client, spec)
    if args.read_count:
        assert learner.consumer is not None
        learner.consumer.config = dataclasses.replace(learner.consumer.config, read_count=args.read_count)
    probe = Probe(learner)
    status = learner.run()
    if status is not rs.RunStatus.SUCCEEDED:
        raise RuntimeError(f"run {run_id} ended {status}")
    entries: Any = client.xrange(rs.run_metrics_key(run_id))
    metrics = [{k.decode(): float(v) for k, v in f.items()} for _, f in entries]
    return probe, batches, metrics


# -- bare loop -----------------------------------------------------------------------------------


def run_bare(args: argparse.Namespace, spec: RunSpec, batches: Batches) -> list[float]:
    """The same steps with nothing around them; wall seconds per step."""
    device = args.device
    model = AutoModelForCausalLM.from_pretrained(spec.student, dtype=torch.float32).to(device).train()
    optimizer = make_optimizer(spec, model)
    ocfg = objective_config(spec)
    timelines = run_state.initial_timelines(spec)
    names, teachers = [r.name for r in spec.rewards], [t.name for t in spec.teachers]
    times = []
    for step, rollouts in enumerate(batches, start=1):
        t0 = time.perf_counter()
        rewards, _ = rewards_matrix(rollouts, names, [None] * len(names))
        packed = pack_sequences(rollouts)
        logits = shared_prompt.response_logits(model, packed.input_ids, packed.starts, packed.lengths).float()
        batch = objective_batch(logits, packed, rollouts, teachers, spec.objective.support, rewards)
        out = objective_loss(ocfg, batch, [timelines[n].at(step) for n in names])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


# -- report --------------------------------------------------------------------------------------


def ms(xs: list[float]) -> str:
    return " ".join(f"{1e3 * x:.0f}" for x in xs)


def summarize(results: dict[str, list[Any]], args: argparse.Namespace, intervals: dict[str, int]) -> None:
    bare = [statistics.median(t[args.warmup :]) for t in results["bare"]]
    b_med = statistics.median(bare)
    print(
        f"\nper-step wall time over {args.repeats} repeats x {args.steps} steps (after {args.warmup} warm-up)"
    )
    print(f"{'config':24s} {'median ms':>9s} {'best ms':>8s} {'x bare':>7s}   "
          + " ".join(f"{p:>10s}" for p in PARTS) + "   wait (timers / metric)")  # fmt: skip
    print(f"{'bare loop':24s} {1e3 * b_med:9.1f} {1e3 * min(bare):8.1f} {1.0:7.2f}")
    for name in ("large", "small"):
        runs = results[name]
        totals = [statistics.median(s["total"] for s in parts) for parts, _ in runs]
        med = statistics.median(totals)
        share = {p: statistics.median(s[p] for parts, _ in runs for s in parts) for p in PARTS}
        wait = statistics.median(
            sum(s["read"] for s in parts) / sum(s["total"] for s in parts) for parts, _ in runs
        )
        metric = statistics.median(m for _, m in runs)
        label = f"pipeline, ckpt every {intervals[name]}"
        print(f"{label:24s} {1e3 * med:9.1f} {1e3 * min(totals):8.1f} {med / b_med:7.2f}   "
              + " ".join(f"{1e3 * share[p]:8.1f}ms" for p in PARTS)
              + f"   {wait:.3f} / {metric:.3f}")  # fmt: skip
        print(f"  overhead vs bare: {100 * (med / b_med - 1):+.1f}% (median), "
              f"{100 * (min(totals) / min(bare) - 1):+.1f}% (best); goal <= +10%")  # fmt: skip
    print("\nper-step ms of the last repeat (warm-up included):")
    print(f"  bare:  {ms(results['bare'][-1])}")
    for name in ("large", "small"):
        print(f"  {name}: {ms([s['total'] for s in results[name][-1][0]])}")


def check_same_batches(probe: Probe, batches: Batches) -> None:
    expected = [[r.rollout_id for r in b] for b in batches]
    if probe.trained_ids != expected:
        raise RuntimeError("the learner trained on other batches than the bare loop was given")


def one_repeat(
    args: argparse.Namespace, r: int, env: dict[str, Any], results: dict[str, list[Any]],
    intervals: dict[str, int],
) -> None:  # fmt: skip
    order = ["bare", "large", "small"]
    for name in order[r % 3 :] + order[: r % 3]:  # rotated: no configuration always runs first
        if name == "bare":
            results["bare"].append(run_bare(args, env["spec"], env["batches"]))
            continue
        probe, batches, metrics = run_pipeline(
            args, env["client"], env["url"], env["student"], intervals[name], f"{name}-{r}", env["tmp"]
        )
        check_same_batches(probe, batches)
        results[name].append((probe.parts(args.warmup), metrics[-1]["wait_fraction_total"]))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps per run left out of the figures")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response-min", type=int, default=64)
    p.add_argument("--response-max", type=int, default=128)
    p.add_argument("--group-size", type=int, default=4, help="K responses per prompt")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--top-k", type=int, default=16, help="student top-k (support) and teacher top-k")
    p.add_argument("--small-interval", type=int, default=1, help="the small checkpoint interval")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared box)"
    )
    p.add_argument(
        "--read-count", type=int, default=0,
        help="entries per XREADGROUP (0: the consumer's default; K x prompts-per-step: no read-ahead)",
    )  # fmt: skip
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    intervals = {"large": 10**6, "small": args.small_interval}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        student = build_tiny_model(tmp / "student", TinySpec(vocab_size=args.vocab, hidden_size=args.hidden))
        server = EmbeddedRedis(tmp / "redis", appendfsync="everysec").start()
        client = make_client(server.url)
        try:
            print(json.dumps(vars(args)), f"torch threads={torch.get_num_threads()},",
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
            # A whole warm-up run (not reported) also yields the decoded batches for the bare loop.
            probe, batches, _ = run_pipeline(args, client, server.url, student, 10**6, "warmup", tmp)
            check_same_batches(probe, batches)
            env = {"client": client, "url": server.url, "student": student, "tmp": tmp,
                   "spec": make_spec(args, student, 1), "batches": batches}  # fmt: skip
            results: dict[str, list[Any]] = {"bare": [], "large": [], "small": []}
            for r in range(args.repeats):
                one_repeat(args, r, env, results, intervals)
            summarize(results, args, intervals)
        finally:
            client.close()
            server.stop()


if __name__ == "__main__":
    main()
