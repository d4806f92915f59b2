"""Teacher service benchmark: scored tokens/s through gRPC vs the same hf backend in-process, and
bytes per scored position on the wire vs a JSON encoding of the same data.

Both paths run in one process run on the same random Llama (built in a temp dir, CPU, float32),
the same batches and token budget; the service is a real ``python -m services.teacher`` child on
loopback. Runs alternate between the two paths and the best of N is kept.

    .venv/bin/python -m benchmarks.bench_teacher            # CPU, batch 1/8/32, K=20 and 64
    .venv/bin/python -m benchmarks.bench_teacher --device cuda --hidden 896 --layers 24 \
        --heads 14 --vocab 151936 --prompt 512 --response 512   # GPU: a 0.5B-parameter shape

Goals (issue 4): service overhead <= 10% at batch >= 8; <= 6 bytes per top-K entry with float16
log-probs, >= 5x smaller than JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.distill.v1 import teacher_pb2_grpc
from services.rpc.client import open_channel
from services.teacher.client import TeacherClient, make_item
from services.teacher.domain import ItemScores, ScoreItem, ScoreParams
from services.teacher.hf_backend import HFConfig, HFScorer, load_hf
from services.teacher.tiny_model import TinySpec, build_tiny_model
from services.teacher.wire import encode_request

SERVICE = "distill.v1.TeacherScoring"


def start_server(args: Sequence[str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A real ``python -m services.teacher`` child; returns once its health says SERVING."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.teacher", *args, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text())
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1).status == 1:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)


def in_process(scorer: HFScorer, items: Sequence[ScoreItem], params: ScoreParams, budget: int) -> None:
    """The backend alone: the same forward batches the server's token budget would form."""
    length = int(items[0].token_ids.shape[0])
    rows = max(1, budget // length)
    for i in range(0, len(items), rows):
        scorer.score_batch([(it, params) for it in items[i : i + rows]])


async def measure(
    scorer: HFScorer, client: TeacherClient, items: list[ScoreItem], k: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Best-of-N seconds in-process and through the service, runs interleaved so load hits both alike.

    The minimum, not the median: on a shared machine the other processes only ever add time.
    """
    params = ScoreParams(top_k=k)
    in_process(scorer, items, params, args.budget)  # warm-up of both paths
    await service_time(client, items, k)
    local, remote = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        in_process(scorer, items, params, args.budget)
        local.append(time.perf_counter() - start)
        remote.append(await service_time(client, items, k))
    return min(local), min(remote)


async def service_time(client: TeacherClient, items: list[ScoreItem], k: int) -> float:
    start = time.perf_counter()
    await client.score(items, top_k=k, dtype="float16")
    return time.perf_counter() - start


def _json_array(values: np.ndarray) -> str:
    if values.ndim > 1:
        return "[" + ",".join(_json_array(row) for row in values) + "]"
    if values.dtype.kind == "i":
        return "[" + ",".join(str(int(v)) for v in values) + "]"
    return "[" + ",".join(str(np.float16(v)) for v in values) + "]"  # shortest float16 round trip


def json_bytes(scores: Sequence[ItemScores]) -> int:
    """The most compact honest JSON: ints as ints, each float16 value in its shortest round-trip form."""
    names = ("token_logprobs", "top_ids", "top_logprobs", "outside_mass")
    docs = ["{" + ",".join(f'"{n}":{_json_array(getattr(s, n))}' for n in names) + "}" for s in scores]
    text = "[" + ",".join(docs) + "]"
    json.loads(text)  # it is valid JSON
    return len(text.encode())


def naive_json_bytes(scores: Sequence[ItemScores]) -> int:
    """JSON as an API would usually send it: ``json.dumps`` of ``.tolist()`` of the given values."""
    names = ("token_logprobs", "top_ids", "top_logprobs", "outside_mass")
    return len(json.dumps([{n: getattr(s, n).tolist() for n in names} for s in scores]).encode())


async def wire_sizes(address: str, items: list[ScoreItem], k: int) -> dict[str, float]:
    channel = open_channel(address)
    try:
        request = encode_request(items, ScoreParams(top_k=k), "float16")
        reply = await teacher_pb2_grpc.TeacherScoringStub(channel).Score(request, timeout=600)
    finally:
        await channel.close()
    positions = sum(s.num_positions for s in reply.scores)
    topk_bytes = sum(len(s.top_ids) + len(s.top_logprobs) for s in reply.scores)
    async with TeacherClient([address], deadline_s=600) as client:
        scores = await client.score(items, top_k=k, dtype="float16")
        scores32 = await client.score(items, top_k=k, dtype="float32")
    return {
        "proto_per_position": reply.ByteSize() / positions,
        "proto_per_topk_entry": reply.ByteSize() / (positions * k),
        "topk_fields_per_entry": topk_bytes / (positions * k),
        "json_per_position": json_bytes(scores) / positions,
        "naive_json_per_position": naive_json_bytes(scores) / positions,
        "f32_json_per_position": naive_json_bytes(scores32) / positions,
    }


def make_items(n: int, prompt: int, response: int, vocab: int, seed: int) -> list[ScoreItem]:
    rng = np.random.default_rng(seed)
    return [make_item(rng.integers(0, vocab, prompt + response), prompt) for _ in range(n)]


async def run(args: argparse.Namespace, model_dir: Path) -> None:
    scorer = load_hf(
        HFConfig(model=str(model_dir), device=args.device, max_top_k=64, max_batch_tokens=args.budget)
    )
    server_args = [
        "--model",
        str(model_dir),
        "--device",
        args.device,
        "--max-batch-tokens",
        str(args.budget),
        "--max-top-k",
        "64",
    ]
    proc, address = start_server(server_args, model_dir / "server.log")
    try:
        async with TeacherClient([address], deadline_s=600) as client:
            print(
                f"{'batch':>5} {'K':>3} {'in-process tok/s':>17} {'service tok/s':>14} {'overhead':>9} "
                f"{'added ms/call':>13}"
            )
            for k in args.top_k:
                for batch in args.batch:
                    items = make_items(batch, args.prompt, args.response, args.vocab, seed=batch * 100 + k)
                    t_local, t_remote = await measure(scorer, client, items, k, args)
                    tokens = batch * args.response
                    print(
                        f"{batch:>5} {k:>3} {tokens / t_local:>17.0f} {tokens / t_remote:>14.0f} "
                        f"{t_remote / t_local - 1:>+9.1%} {(t_remote - t_local) * 1e3:>+13.1f}"
                    )
            print("\nwire (float16 log-probs, int32 ids), batch 8:")
            for k in args.top_k:
                sizes = await wire_sizes(address, make_items(8, args.prompt, args.response, args.vocab, 7), k)
                print(
                    f"  K={k}: {sizes['proto_per_position']:.1f} B/position on the wire "
                    f"({sizes['proto_per_topk_entry']:.2f} B per top-K entry all fields included, "
                    f"{sizes['topk_fields_per_entry']:.2f} B in the top-K fields)\n"
                    f"        JSON, shortest float16 digits: {sizes['json_per_position']:.1f} B/position = "
                    f"{sizes['json_per_position'] / sizes['proto_per_position']:.1f}x larger\n"
                    f"        JSON, json.dumps(.tolist()): {sizes['naive_json_per_position']:.1f} B/pos = "
                    f"{sizes['naive_json_per_position'] / sizes['proto_per_position']:.1f}x larger\n"
                    f"        JSON of the float32 log-probs: {sizes['f32_json_per_position']:.1f} B/pos = "
                    f"{sizes['f32_json_per_position'] / sizes['proto_per_position']:.1f}x larger"
                )
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--top-k", type=int, nargs="+", default=[20, 64])
    p.add_argument("--budget", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (both paths alike)")
    args = p.parse_args()
    # Spinning OpenMP pools of two processes on a small shared machine distort both paths; a fixed,
    # equal thread count keeps the comparison about the service, not about scheduling.
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            max_length=args.prompt + args.response,
        )
        model_dir = build_tiny_model(Path(tmp) / "teacher", spec)
        print(
            f"model: Llama vocab={args.vocab} hidden={args.hidden} layers={args.layers} on {args.device}; "
            f"sequences of {args.prompt}+{args.response} tokens, scored tokens = response positions"
        )
        asyncio.run(run(args, model_dir))


if __name__ == "__main__":
    main()
