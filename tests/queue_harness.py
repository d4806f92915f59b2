"""A small real learner process for the fault tests: ``python -m tests.queue_harness --help``.

It uses ``learner.queue`` and ``learner.checkpoint`` unchanged and "applies" each batch by one
optimizer step of a tiny torch model on features of the rollouts, appending the rollout ids to a
ledger kept inside its checkpoint. ``HARNESS_CRASH=<point>:<step>`` makes it SIGKILL itself at a
named point of that step (the harness honours it, production code knows nothing of it):

- ``mid_batch``: half of the batch's losses accumulated, before the optimizer step
- ``after_step``: optimizer stepped, before the checkpoint
- ``mid_checkpoint``: checkpoint files written to the temp dir, before its manifest and rename
- ``after_checkpoint``: checkpoint durable, before the acknowledgement

It exits 0 once the applied ledger plus the dead letters account for ``--expect`` rollouts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from contracts.redis_server import make_client
from learner import checkpoint as ckpt_mod
from learner.applied import AppliedIds
from learner.checkpoint import (
    Checkpoint,
    capture_rng,
    load_latest,
    publish_weights,
    restore_rng,
    save_checkpoint,
)
from learner.queue import Batch, ConsumerConfig, QueuedRollout, RolloutConsumer

logger = logging.getLogger("tests.queue_harness")
CRASH = os.environ.get("HARNESS_CRASH", "")
CURRENT = {"step": 0}  # the step being checkpointed, for the mid_checkpoint crash


def crash_here(point: str, step: int) -> None:
    if f"{point}:{step}" == CRASH:
        logger.info("crashing at %s of step %d", point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def features(q: QueuedRollout) -> torch.Tensor:
    ids = torch.from_numpy(q.rollout.token_ids[:8].astype("float32")) / 100.0  # (8,)
    return torch.nn.functional.pad(ids, (0, 8 - ids.numel()))


def apply_batch(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch, step: int) -> float:
    opt.zero_grad()
    rollouts = batch.rollouts
    total = 0.0
    for i, q in enumerate(rollouts):
        if i == len(rollouts) // 2:
            crash_here("mid_batch", step)
        loss = (model(features(q)) - q.rollout.rewards[0].value).pow(2).sum() / len(rollouts)
        loss.backward()
        total += float(loss.detach())
    opt.step()
    return total


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--consumer", default="learner")
    p.add_argument("--groups-per-step", type=int, default=2)
    p.add_argument("--expect", type=int, required=True, help="rollouts to account for before exiting")
    p.add_argument("--claim-idle-ms", type=int, default=60_000)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of extra 'work' per step")
    p.add_argument("--max-staleness", type=int, default=1000)
    return p.parse_args()


def restore(
    args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, list[str], AppliedIds]:
    state = load_latest(args.run_dir / "checkpoints")
    if state is None:
        return 0, [], AppliedIds()
    model.load_state_dict(state.model)
    opt.load_state_dict(state.optimizer)
    restore_rng(state.rng)
    logger.info("resumed from step %d", state.step)
    return state.step, list(state.extra["ledger"]), AppliedIds.from_state(state.applied)


def install_mid_checkpoint_crash() -> None:
    original = ckpt_mod._write_json

    def write_json(path: Path, value: Any) -> None:
        if path.name == "manifest.json":
            crash_here("mid_checkpoint", CURRENT["step"])
        original(path, value)

    ckpt_mod._write_json = write_json


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step, ledger, applied = restore(args, model, opt)
    install_mid_checkpoint_crash()
    client = make_client(args.redis_url)
    cfg = ConsumerConfig(run_id=args.run_id, consumer=args.consumer, max_staleness=args.max_staleness,
                         claim_idle_ms=args.claim_idle_ms, claim_interval_s=0.2, block_ms=100)  # fmt: skip
    consumer = RolloutConsumer(client, cfg, applied)
    publish_weights(args.run_dir, args.run_id, step, model.state_dict(), client)
    while len(ledger) + sum(v for k, v in consumer.counters().items() if k.startswith("dead:")) < args.expect:
        batch = consumer.next_batch(args.groups_per_step, policy_version=step, timeout_s=1.0)
        if not batch.groups:
            continue
        deadline = time.monotonic() + args.step_sleep
        while time.monotonic() < deadline:  # a long step that keeps its claim fresh
            time.sleep(0.05)
            consumer.refresh_claims()
        loss = apply_batch(model, opt, batch, step + 1)
        ledger += [q.rollout.rollout_id for q in batch.rollouts]
        consumer.mark_applied(batch)
        crash_here("after_step", step + 1)
        step += 1
        CURRENT["step"] = step
        save_checkpoint(args.run_dir / "checkpoints", Checkpoint(
            step=step, model=model.state_dict(), optimizer=opt.state_dict(), schedule={"lambda": 0.1 * step},
            applied=consumer.applied.to_state(), rng=capture_rng(), extra={"ledger": ledger},
        ))  # fmt: skip
        crash_here("after_checkpoint", step)
        consumer.ack_applied()
        consumer.trim()
        publish_weights(args.run_dir, args.run_id, step, model.state_dict(), client)
        logger.info("step %d loss %.4f applied %d", step, loss, len(ledger))
    logger.info("done: %d rollouts applied in %d steps", len(ledger), step)


if __name__ == "__main__":
    main()
