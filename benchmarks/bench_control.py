"""Control-plane latency: each REST operation against ``GET /healthz`` measured in the same run.

Starts a real redis-server (AOF off) and ``python -m services.control`` on loopback, then times
sequential requests over one keep-alive connection. ``/healthz`` is the floor (HTTP + uvicorn +
FastAPI, no Redis); every other operation is reported as its median latency and the ratio to that
floor, which is what our Redis transactions (WATCH/MULTI), validation and serialization add.
``/metrics`` is timed with ``--runs`` active runs, each with a metrics entry.

Run: ``python -m benchmarks.bench_control [--requests 300] [--runs 100]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from contracts import runstate as rs
from contracts.redis_server import EmbeddedRedis, make_client
from tests.procs import ServiceProcess, free_port

TOKEN = "bench-token-0123456789abcdef"
SPEC = {
    "student": "students/tiny",
    "dataset": "data/train.jsonl",
    "rewards": [{"name": "acc", "verifier": "exact_match"}],
}


def _timed(call: Callable[[int], httpx.Response], i: int) -> float:
    start = time.perf_counter()
    response = call(i)
    elapsed = time.perf_counter() - start
    if response.status_code >= 400:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    return elapsed


def interleaved_ms(http: httpx.Client, call: Callable[[int], httpx.Response], n: int) -> tuple[float, float]:
    """Median ms of (GET /healthz, ``call``), alternating request by request so that the noise of a
    shared machine hits both alike."""
    base, ours = [], []
    for i in range(n):
        base.append(_timed(lambda _: http.get("/healthz"), i))
        ours.append(_timed(call, i))
    return 1000 * statistics.median(base), 1000 * statistics.median(ours)


def run(http: httpx.Client, redis_url: str, requests: int, runs: int) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(50):  # warm-up: connections, imports, JIT-free but cache-warm
        http.get("/healthz")
    run_id = http.post("/v1/runs", json=SPEC, headers=auth).json()["id"]
    schedule = {"schedules": {"acc": {"kind": "constant", "value": 0.5}}}
    ops: dict[str, tuple[Callable[[int], httpx.Response], int]] = {
        "POST /v1/runs": (lambda i: http.post("/v1/runs", json=SPEC, headers=auth), requests),
        "GET /v1/runs/{id}": (lambda i: http.get(f"/v1/runs/{run_id}"), requests),
        "POST stop/resume": (
            lambda i: http.post(f"/v1/runs/{run_id}/{'stop' if i % 2 else 'resume'}", headers=auth),
            requests,
        ),
        "PUT /schedule": (
            lambda i: http.put(f"/v1/runs/{run_id}/schedule", json=schedule, headers=auth),
            requests,
        ),
        "GET /v1/runs?limit=50": (lambda i: http.get("/v1/runs", params={"limit": 50}), requests),
    }
    print(f"{'operation':<36} {'healthz ms':>10} {'op ms':>8} {'x healthz':>10}")
    for name, (call, n) in ops.items():
        base, ours = interleaved_ms(http, call, n)
        print(f"{name:<36} {base:>10.2f} {ours:>8.2f} {ours / base:>10.2f}")
    redis = make_client(redis_url)
    for raw in redis.zrange(rs.runs_index_key(), -runs, -1):
        run = raw.decode() if isinstance(raw, bytes) else str(raw)
        redis.xadd(rs.run_metrics_key(run), {"step": "1", "dense_kl": "0.5", "policy_lag": "1"})
    total = redis.zcard(rs.runs_index_key())
    base, ours = interleaved_ms(http, lambda i: http.get("/metrics"), max(20, requests // 10))
    name = f"GET /metrics ({total} runs, {runs} labelled)"
    print(f"{name:<36} {base:>10.2f} {ours:>8.2f} {ours / base:>10.2f}")


def _wait(proc: ServiceProcess, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.proc.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"control plane did not start:\n{proc.log()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-control-"))
    server = EmbeddedRedis(work / "redis", appendonly=False).start()
    port = free_port()
    env = {"DISTILL_API_TOKEN": TOKEN, "DISTILL_METRICS_MAX_RUNS": str(args.runs)}
    proc = ServiceProcess(
        "services.control", ["--port", str(port), "--redis-url", server.url, "--log-level", "warning"],
        work / "control.log", env=env,
    )  # fmt: skip
    try:
        _wait(proc, f"http://127.0.0.1:{port}/healthz")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, sequential requests, one connection")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            run(http, server.url, args.requests, args.runs)
    finally:
        proc.stop()
        server.stop()


if __name__ == "__main__":
    main()
