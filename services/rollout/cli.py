"""Command line of the rollout worker: ``python -m services.rollout [--run-id ID]``.

With ``--run-id`` it works on that run until the run ends; without, it serves: it works on
whichever run is queued or running, then looks for the next. Needs ``REDIS_URL`` (the run's
Redis) and, when a run has rewards, ``--reward-address``.
``--sampler vllm`` samples with vLLM on the GPU (the ``gpu`` extra) instead of transformers.
Teacher addresses come from the control plane's registry in Redis. SIGTERM finishes the
prompt group in progress (its lease is released by expiry if it cannot) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import zlib

import redis.asyncio
import torch

from contracts import runstate as rs
from contracts.redis_server import make_async_client
from services.rollout.sampler import SAMPLERS
from services.rollout.vllm_sampling import VllmSamplerConfig
from services.rollout.worker import RolloutWorker, WorkerConfig

log = logging.getLogger("rollout")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.rollout", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", help="work on this run (default: serve every run, one after another)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL")
    p.add_argument("--reward-address", default=os.environ.get("REWARD_ADDRESS"), help="host:port")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: from the worker id)")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often to look for runs to serve")
    p.add_argument("--lease-ttl-s", type=float, default=120.0, help="a prompt held longer is re-leased")
    p.add_argument("--teacher-deadline-s", type=float, default=60.0, help="deadline of each Score call")
    p.add_argument("--prompts-per-batch", type=int, default=0,
                   help="prompts sampled and scored together (0: the run's prompts_per_step)")  # fmt: skip
    p.add_argument(
        "--sampler", choices=SAMPLERS, default="hf",
        help="hf: the transformers model on --device (KV-cached decoding for Llama and Qwen2, else "
        "generate); vllm: vLLM on the GPU (needs the gpu extra)",
    )  # fmt: skip
    v = p.add_argument_group("vllm sampler (--sampler vllm)")
    v.add_argument("--vllm-dtype", default="auto", help="vLLM dtype: auto, float32, bfloat16, float16")
    v.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5, help="share of the GPU")
    v.add_argument("--vllm-enforce-eager", action="store_true", help="no CUDA graphs")
    v.add_argument("--vllm-max-logprobs", type=int, default=64, help="largest top-K the run may ask for")
    a = p.parse_args(argv)
    if a.prompts_per_batch < 0:
        p.error(f"--prompts-per-batch: must be >= 0, got {a.prompts_per_batch}")
    return a


async def _active_run(client: redis.asyncio.Redis) -> str | None:
    """The oldest run that is queued or running and not asked to stop."""
    for raw in await client.zrange(rs.runs_index_key(), 0, -1):
        run_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        state = await client.hgetall(rs.run_state_key(run_id))
        status, desired = state.get(b"status", b""), state.get(b"desired", b"")
        if status in (b"queued", b"running") and desired == b"run":
            return run_id
    return None


async def _run(a: argparse.Namespace) -> int:
    client = make_async_client(a.redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            run_id = a.run_id or await _active_run(client)
            if run_id is None:
                await asyncio.sleep(a.poll_s)
                continue
            published = await RolloutWorker(_config(a, run_id), client).run(stop)
            log.info("run %s: published %d prompt groups", run_id, published)
            if a.run_id:
                break
    finally:
        await client.aclose()
    return 0


def _config(a: argparse.Namespace, run_id: str) -> WorkerConfig:
    seed = a.seed if a.seed is not None else zlib.crc32(a.worker_id.encode())
    return WorkerConfig(
        run_id=run_id, worker_id=a.worker_id, reward_address=a.reward_address,
        teacher_token=os.environ.get("TEACHER_TOKEN"), reward_token=os.environ.get("REWARD_TOKEN"),
        device=a.device, seed=seed, lease_ttl_s=a.lease_ttl_s, teacher_deadline_s=a.teacher_deadline_s,
        sampler=a.sampler, prompts_per_batch=a.prompts_per_batch,
        vllm=VllmSamplerConfig(
            dtype=a.vllm_dtype, enforce_eager=a.vllm_enforce_eager, seed=seed,
            gpu_memory_utilization=a.vllm_gpu_memory_utilization, max_logprobs=a.vllm_max_logprobs,
        ),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = _args(argv)
    if not a.redis_url:
        log.error("no Redis: pass --redis-url or set REDIS_URL to the run's Redis")
        return 2
    return asyncio.run(_run(a))


if __name__ == "__main__":
    sys.exit(main())
