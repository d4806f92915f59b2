"""Command line of the learner: ``python -m learner [--run-id ID]`` (or under ``torchrun``).

With ``--run-id`` it trains that run; without, it serves: it waits for a queued run (or a
running one whose learner died) in Redis, claims it, trains it, and looks for the next.
Connects to ``REDIS_URL`` (or starts an embedded redis-server in the run directory) and sets up
DDP when launched by torchrun (gloo on CPU, nccl on GPU). With ``--run-id`` the exit code is the
run's outcome: 0 succeeded (or left to a restarted learner after SIGTERM), 3 stopped, 1 failed.
SIGTERM (or Ctrl-C) finishes the step in progress, writes a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import redis
import torch
import torch.distributed as dist

from contracts import runstate as rs
from contracts.redis_server import connect
from contracts.runspec import RunSpec
from learner.run_state import LearnerLease, claimable_runs
from learner.train import Learner, LearnerConfig

log = logging.getLogger("learner")
EXIT_CODES = {rs.RunStatus.SUCCEEDED: 0, rs.RunStatus.STOPPED: 3, rs.RunStatus.RUNNING: 0}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m learner", description=__doc__.splitlines()[0])
    p.add_argument("--run-id", help="train this run (default: serve queued runs one after another)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="run directories live here")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-timeout-s", type=float, default=5.0)
    p.add_argument("--lease-ttl-s", type=float, default=30.0, help="heartbeat lease on the run")
    p.add_argument("--poll-s", type=float, default=1.0, help="how often to look for runs to serve")
    p.add_argument("--claim-idle-ms", type=int, default=60_000, help="claim entries idle this long")
    p.add_argument("--max-deliveries", type=int, default=3, help="dead-letter a bad entry after this many")
    p.add_argument("--audit", action="store_true", help="record every applied rollout id in checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept per run (>= 1)")
    a = p.parse_args(argv)
    if a.keep_checkpoints < 1:
        p.error(f"--keep-checkpoints: must be >= 1, got {a.keep_checkpoints}")
    return a


def _init_distributed(device: str) -> str:
    if "RANK" not in os.environ:
        return device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def _broadcast(value: object) -> object:
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


class _Service:
    """Claims runs and trains them; rank 0 talks to Redis, other ranks follow its choices."""

    def __init__(self, a: argparse.Namespace, client: redis.Redis | None, device: str) -> None:
        self.a, self.client, self.device = a, client, device
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.exiting = False
        self.current: Learner | None = None
        self._waiting = False

    def request_exit(self) -> None:
        self.exiting = True
        if self.current is not None:
            self.current.request_exit()

    def _claim(self) -> tuple[str, LearnerLease] | None:
        assert self.client is not None
        candidates = [self.a.run_id] if self.a.run_id else claimable_runs(self.client)
        for run_id in candidates:
            lease = LearnerLease(self.client, run_id, self.holder, self.a.lease_ttl_s)
            if lease.claim():
                return run_id, lease
            if self.a.run_id and not self._waiting:
                log.warning("run %s is held by another learner; waiting for its lease to lapse", run_id)
                self._waiting = True
        return None

    def train(self, run_id: str, lease: LearnerLease | None) -> rs.RunStatus:
        raw = self.client.get(rs.run_spec_key(run_id)) if self.client is not None else None
        spec = RunSpec.model_validate_json(_broadcast(raw))  # type: ignore[arg-type]
        cfg = LearnerConfig(run_id, self.a.runs_dir / run_id, "learner", self.device, self.a.batch_timeout_s,
                            claim_idle_ms=self.a.claim_idle_ms, max_deliveries=self.a.max_deliveries,
                            audit=self.a.audit, keep_checkpoints=self.a.keep_checkpoints)  # fmt: skip
        self.current = Learner(cfg, self.client, spec, lease)
        if lease is not None:
            lease.start()
        try:
            return self.current.run()
        finally:
            self.current = None
            if lease is not None:
                lease.release()

    def next_claim(self) -> tuple[str, LearnerLease | None] | None:
        """Rank 0 claims; every rank learns the run id (None: nothing to do now)."""
        claim = self._claim() if self.client is not None else None
        run_id = _broadcast(claim[0] if claim else None)
        if run_id is None:
            return None
        return str(run_id), (claim[1] if claim else None)


def _serve(svc: _Service, once: bool) -> int:
    while not svc.exiting:
        claim = svc.next_claim()
        if claim is None:  # nothing to serve, or (with --run-id) a live learner still holds the run
            time.sleep(svc.a.poll_s)
            continue
        log.info("training run %s", claim[0])
        status = svc.train(*claim)
        if once:
            return EXIT_CODES.get(status, 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = _args(argv)
    device = _init_distributed(a.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    client, embedded = connect(a.redis_url, a.runs_dir / "redis") if rank == 0 else (None, None)
    if embedded is not None:
        log.info("no REDIS_URL: embedded redis-server at %s", embedded.url)
    svc = _Service(a, client, device)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.request_exit())
    try:
        if a.run_id and client is not None and client.get(rs.run_spec_key(a.run_id)) is None:
            log.error(
                "run %s has no spec in Redis: create it first (POST /v1/runs or `distill run`)", a.run_id
            )
            return 2
        return _serve(svc, once=bool(a.run_id))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if embedded is not None:
            embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
