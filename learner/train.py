"""The learner process: read rollouts, step the student, checkpoint, acknowledge, publish weights.

Top to bottom, one run (``python -m learner --run-id ID``)::

    setup:      run spec from Redis → student + optimizer → restore the latest checkpoint
                → consumer group on the rollout stream → publish the starting weights
    each step:  whole prompt groups → student logits (each distinct prompt computed once where the
                architecture allows: services.rollout.shared_prompt)
                → Dense + Sparse objective (learner.objective)
                → clip → optimizer step → publish weights (version + 1) → metrics
                (publication and metrics run in order on a background thread: learner.side_writes)
    metrics:    one entry per step in the run's metrics stream; besides the loss parts, ``data_wait_s``
                (seconds spent waiting for whole groups in ``_next_batch`` since the previous step),
                ``wait_fraction`` (that wait over the step's wall time) and ``wait_fraction_total``
                (the same since this learner process started): near 0 when rollouts are waiting,
                near 1 when the learner starves (see benchmarks/bench_learner.py)
    checkpoint: every ``checkpoint_interval`` steps, durable first, then XACK (exactly once:
                a restart re-reads unacknowledged entries and skips those the checkpoint lists)
    end:        honours stop at a step boundary; final checkpoint; status succeeded | stopped

Several ranks (``torchrun --nproc-per-node N -m learner``): rank 0 alone talks to Redis and
shares each batch's groups out; DDP averages the gradients; rank 0 checkpoints and acknowledges.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch
import torch.distributed as dist
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from contracts import keys
from contracts import runstate as rs
from contracts.runspec import OptimizerSpec, RunSpec, lr_at, on_policy_share
from contracts.schedules import ScheduleTimeline
from learner import run_state
from learner.applied import AppliedIds
from learner.batching import (
    BatchError,
    Packed,
    check_vocab,
    mean_support_size,
    objective_batch,
    pack_sequences,
    response_logits,
    rewards_matrix,
)
from learner.checkpoint import (
    Checkpoint,
    capture_rng,
    load_latest,
    publish_weights,
    restore_rng,
    save_checkpoint,
)
from learner.objective import ObjectiveBatch, ObjectiveConfig, objective_loss
from learner.queue import Batch, ConsumerConfig, Group, RolloutConsumer
from learner.run_state import LearnerLease
from learner.side_writes import SideWrites, snapshot
from services.rollout import cached_decoder, shared_prompt

log = logging.getLogger(__name__)


@dataclass
class LearnerConfig:
    run_id: str
    run_dir: Path  # checkpoints/ and weights/ live here
    consumer: str  # this process's consumer name in the stream's group
    device: str = "cpu"
    batch_timeout_s: float = 5.0  # wait this long for whole groups before checking stop requests
    keep_checkpoints: int = 3
    claim_idle_ms: int = 60_000  # entries idle this long are claimed (a dead consumer's, or poison retries)
    max_deliveries: int = 3  # an entry that fails to decode this many times is dead-lettered
    audit: bool = False  # keep every applied rollout id in the checkpoint, step by step (for audits)
    gc_interval: int = 50  # steps between manual garbage collections (0: Python's automatic GC)


@dataclass
class DataWait:
    """Time the learner waits for rollouts: per step, and in total since the learner started."""

    since: float = field(default_factory=time.perf_counter)  # end of the previous step
    step_s: float = 0.0  # waited in _next_batch since then (empty polls included)
    total_wait_s: float = 0.0
    total_wall_s: float = 0.0

    def close_step(self) -> dict[str, float]:
        """The step's ``data_wait_s``, ``wait_fraction`` and ``wait_fraction_total``; starts the next."""
        now = time.perf_counter()
        wall = max(now - self.since, self.step_s, 1e-9)
        self.total_wait_s += self.step_s
        self.total_wall_s += wall
        out = {
            "data_wait_s": self.step_s,
            "wait_fraction": self.step_s / wall,
            "wait_fraction_total": self.total_wait_s / self.total_wall_s,
        }
        self.since, self.step_s = now, 0.0
        return out


def objective_config(spec: RunSpec) -> ObjectiveConfig:
    o = spec.objective
    params = {"jsd": {"beta": o.jsd_beta}, "kl_mix": {"forward_weight": o.kl_mix_forward_weight}}
    return ObjectiveConfig(
        gamma=o.gamma,
        divergence=o.divergence,
        divergence_params=params.get(o.divergence, {}),
        baseline=o.baseline,
        normalization=o.normalization,
        teacher_weights=tuple(t.weight for t in spec.teachers),
        reward_names=tuple(r.name for r in spec.rewards),
        token_importance=o.token_importance,
        token_importance_threshold=o.token_importance_threshold,
        selective=o.selective,
        selective_k=o.selective_k,
        selective_beta=o.selective_beta,
    )


def make_optimizer(spec: RunSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    # fused: one kernel for all the parameters, where the default runs ~10 ops per tensor; at the
    # demo student's size that is most of the step's optimizer time (benchmarks/bench_optimizer.py)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, o: OptimizerSpec, done: int, steps: int) -> float:
    """Set the rate of the step after ``done`` of ``steps`` (``o.schedule``) and return it; derived
    from the step alone, so a resumed run needs no scheduler state."""
    lr = lr_at(o, done, steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Learner:
    def __init__(
        self, cfg: LearnerConfig, client: redis.Redis | None, spec: RunSpec, lease: LearnerLease | None = None
    ) -> None:
        self.cfg, self.client, self.spec, self.lease = cfg, client, spec, lease
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.objective = objective_config(spec)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_pretrained(spec.student, dtype=torch.float32)
        self.model: PreTrainedModel = model.to(cfg.device).train()  # type: ignore[arg-type]
        self.optimizer = make_optimizer(spec, self.model)
        self.step, self.version = 0, 0
        self.timelines = run_state.initial_timelines(spec)
        self.applied = AppliedIds()
        self.applied_log: list[list[str]] = []  # with cfg.audit: the rollout ids of each step
        self._restore()
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None
        # DDP's gradient hooks need the model's own forward pass
        self.shares_prompts = self.ddp is None and cached_decoder.supports(self.model)
        self.consumer = self._consumer() if self.rank == 0 else None
        self._exit_requested = False
        self._carry: list[Group] = []  # whole groups read but not yet trained on
        self._last_teacher = (0.0, 0.0)  # producer counters (teacher calls, latency sum) at the last step
        self._entropy = 0.0  # mean student entropy of the last step's batch (sampling.length_curriculum)
        self.data_wait = DataWait()
        self.side = SideWrites()  # rank 0's weights publication and metrics, off the training thread

    def request_exit(self) -> None:
        """Finish the step in progress, checkpoint and return (SIGTERM); the run stays running."""
        self._exit_requested = True

    # -- setup -----------------------------------------------------------------------------------

    def _restore(self) -> None:
        ckpt = load_latest(self.cfg.run_dir / "checkpoints")
        if ckpt is None:
            return
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.step = ckpt.step
        self.version = int(ckpt.extra.get("policy_version", ckpt.step))
        self.timelines = {k: ScheduleTimeline.from_dict(v) for k, v in ckpt.schedule.items()}
        self.applied = AppliedIds.from_state(ckpt.applied)
        self.applied_log = ckpt.extra.get("applied_log", [])
        restore_rng(ckpt.rng)
        log.info("resumed from step %d (policy version %d)", self.step, self.version)

    def _consumer(self) -> RolloutConsumer:
        assert self.client is not None
        config = ConsumerConfig(
            self.cfg.run_id, self.cfg.consumer, self.spec.max_staleness,
            max_deliveries=self.cfg.max_deliveries, claim_idle_ms=self.cfg.claim_idle_ms,
        )  # fmt: skip
        return RolloutConsumer(self.client, config, applied=self.applied)

    def _publish(self) -> None:
        """Publish the current weights as ``self.version`` (rank 0), in the background."""
        client, run_dir, run_id, version = self.client, self.cfg.run_dir, self.cfg.run_id, self.version
        assert client is not None
        weights = snapshot(self.model.state_dict())
        self.side.submit(lambda: publish_weights(run_dir, run_id, version, weights, client))

    def _publish_start(self) -> None:
        # Steps after the last checkpoint were lost with the crash, but their weights were
        # published: the restored weights get a new, higher version so that versions only grow.
        assert self.client is not None
        current = self.client.get(keys.policy_version(self.cfg.run_id))
        if current is not None and int(current) > self.version:
            self.version = int(current) + 1
        self._publish()
        self.side.flush()  # workers start from these weights

    # -- one step ----------------------------------------------------------------------------------

    def _usable(self, groups: list[Group]) -> list[Group]:
        """Groups fit to train on. Dead-lettered instead: ids outside the student's vocabulary, or a
        failed reward with no failure_value."""
        assert self.consumer is not None
        names = [r.name for r in self.spec.rewards]
        fallbacks = [r.failure_value for r in self.spec.rewards]
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        keep = []
        for group in groups:
            rollouts = [m.rollout for m in group.members]
            try:
                for r in rollouts:
                    check_vocab(r, vocab)
            except BatchError as err:
                self.consumer.reject_group(group, "invalid", str(err))
                continue
            if rewards_matrix(rollouts, names, fallbacks)[1]:
                self.consumer.reject_group(group, "reward_failed", "a verifier failed or timed out")
            else:
                keep.append(group)
        return keep

    def _pause_requested(self) -> bool:
        assert self.client is not None
        desired = self.client.hget(rs.run_state_key(self.cfg.run_id), "desired")
        lost = self.lease is not None and self.lease.lost.is_set()
        return self._exit_requested or lost or desired == rs.Desired.STOP.value.encode()

    def _next_batch(self) -> Batch:
        """A full batch of ``prompts_per_step`` whole groups, or none when a stop or exit is requested
        first (the groups gathered so far wait in ``_carry`` for the next call)."""
        assert self.consumer is not None
        want = self.spec.sampling.prompts_per_step
        while len(self._carry) < want:
            got = self.consumer.next_batch(want - len(self._carry), self.version, self.cfg.batch_timeout_s)
            self._carry += self._usable(got.groups)
            if len(self._carry) < want and self._pause_requested():
                return Batch([])
        batch, self._carry = Batch(self._carry[:want]), self._carry[want:]
        return batch

    def _lambdas(self, step: int) -> list[float]:
        """λ_n in effect at ``step`` (the step being trained, counted from 1)."""
        return [self.timelines[r.name].at(step) for r in self.spec.rewards]

    def _shard(self, batch: Batch) -> list[Any]:
        """This rank's rollouts (whole groups, round-robin), and the global response count."""
        groups: list[Any] = [[m.rollout for m in g.members] for g in batch.groups] if self.rank == 0 else []
        if self.world > 1:
            box = [groups]
            dist.broadcast_object_list(box, src=0)
            groups = box[0]
        return [r for i, g in enumerate(groups) if i % self.world == self.rank for r in sorted(g, key=_gi)]

    def train_step(self, rollouts: list[Any], total: int) -> dict[str, float]:
        """One optimizer step on this rank's ``rollouts`` (``total`` responses over all ranks)."""
        names = [r.name for r in self.spec.rewards]
        rewards, _ = rewards_matrix(rollouts, names, [r.failure_value for r in self.spec.rewards])
        packed = pack_sequences(rollouts)
        teachers = [t.name for t in self.spec.teachers]
        o = self.spec.objective
        logits = self._response_logits(packed).float()
        batch = objective_batch(
            logits, packed, rollouts, teachers, o.support, rewards, top_p=o.top_p,
            with_teacher_tops=o.selective == "greedy_top_k" and o.support != "full",
        )  # fmt: skip
        self._observe_entropy(batch)
        out = objective_loss(self.objective, batch, self._lambdas(self.step + 1))
        # DDP averages over ranks; rescaling by this rank's share makes it the global normalization.
        scale = len(rollouts) * self.world / max(total, 1)
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss * scale).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optimizer.grad_clip)
        lr = set_lr(self.optimizer, self.spec.optimizer, self.step, self.spec.steps)
        self.optimizer.step()
        metrics = {
            "loss": float(out.loss.detach()), "dense_kl": float(out.kl_mean), "sparse": float(out.sparse),
            "grad_norm": float(grad_norm), "tokens": float(out.num_tokens), "lr": lr,
        }  # fmt: skip
        for n, name in enumerate(names):
            metrics[f"{rs.REWARD_PREFIX}{name}"] = float(rewards[:, n].mean()) if len(rollouts) else 0.0
        metrics |= {name: float(x) for name, x in out.extras.items()}  # the objective's options that are on
        if o.support == "teacher_top_p":
            metrics["support_size"] = mean_support_size(batch)
        return metrics

    def _response_logits(self, packed: Packed) -> Tensor:
        """The student's logits predicting each response token (B, T, V); each distinct prompt is
        computed once where the student's architecture allows it (services.rollout.shared_prompt)."""
        if self.shares_prompts:
            return shared_prompt.response_logits(self.model, packed.input_ids, packed.starts, packed.lengths)
        ids, mask = packed.input_ids.to(self.cfg.device), packed.attention_mask.to(self.cfg.device)
        return response_logits((self.ddp or self.model)(input_ids=ids, attention_mask=mask).logits, packed)

    # -- checkpoint, metrics, loop -----------------------------------------------------------------

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise LeaseLostError(f"run {self.cfg.run_id}: another learner took the run over; stepping down")

    def _checkpoint(self) -> None:
        """Durable checkpoint first, then acknowledge what it covers (RELIABILITY 1-3)."""
        assert self.consumer is not None
        self._check_lease()  # a learner that was frozen past its lease must not write or ack
        ckpt = Checkpoint(
            step=self.step,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            schedule={name: t.to_dict() for name, t in self.timelines.items()},
            applied=self.consumer.applied.to_state(),
            rng=capture_rng(),
            extra={"policy_version": self.version}
            | ({"applied_log": self.applied_log} if self.cfg.audit else {}),
        )
        save_checkpoint(self.cfg.run_dir / "checkpoints", ckpt, keep=self.cfg.keep_checkpoints)
        self.consumer.ack_applied()
        self.consumer.trim()

    def _write_metrics(self, metrics: dict[str, float], versions: list[int], version: int) -> None:
        """Add the queue's and the producers' figures (read now) to a step's metrics and write them."""
        assert self.client is not None
        queue = self._queue_metrics(versions, version)
        run_state.write_metrics(self.client, self.cfg.run_id, metrics | queue)

    def _queue_metrics(self, versions: list[int], version: int) -> dict[str, float]:
        """Queue length, policy lag of the step's rollouts (sampled at ``versions``, trained into
        ``version``), dead letters and the producers' counters since the previous step."""
        assert self.client is not None and self.consumer is not None
        groups = self.client.xinfo_groups(keys.rollout_stream(self.cfg.run_id))
        lag = next((g.get("lag") for g in groups if _text(g["name"]) == self.consumer.group), 0)
        counters = self.consumer.counters()
        producer = {
            _text(k): float(v)
            for k, v in self.client.hgetall(keys.producer_counters(self.cfg.run_id)).items()
        }
        calls = producer.get("teacher_calls", 0.0) - self._last_teacher[0]
        latency = producer.get("teacher_latency_s_sum", 0.0) - self._last_teacher[1]
        self._last_teacher = (producer.get("teacher_calls", 0.0), producer.get("teacher_latency_s_sum", 0.0))
        out = {
            "queue_len": float(lag or 0),
            "policy_lag": float(version - sum(versions) / len(versions)) if versions else 0.0,
            "dead_letters": float(sum(n for name, n in counters.items() if name.startswith("dead:"))),
            "teacher_latency_s": latency / calls if calls > 0 else 0.0,  # mean Score call since the last step
            "reward_timeouts": producer.get("reward_timeouts", 0.0),  # cumulative over the run
        }
        if self.spec.sampling.max_perplexity is not None:  # seed 002 ch. 7, cumulative over the run
            out |= {name: producer.get(name, 0.0) for name in ("rejected_flawed", "flawed_kept")}
        return out

    @torch.no_grad()
    def _observe_entropy(self, batch: ObjectiveBatch) -> None:
        """Mean per-token entropy of the student over the batch's response tokens, all ranks
        together, for the length curriculum (seed 003). Row by row: one (T, V) softmax at a time."""
        if self.spec.sampling.length_curriculum is None:
            return
        total = entropy_sum(batch.logits, batch.mask)
        if self.world > 1:
            dist.all_reduce(total)
        self._entropy = float(total[0] / total[1].clamp(min=1))

    def _rollout_option_metrics(self, batch: Batch) -> dict[str, float]:
        """Metrics of the rollout-side run options that are on; advances the length curriculum."""
        assert self.client is not None
        s, out = self.spec.sampling, {}
        if s.mixes_references:  # seed 002 ch. 4
            refs = [m.rollout.from_reference for m in batch.rollouts]
            out["on_policy_fraction"] = on_policy_share(s.on_policy_fraction, self.step)
            out["reference_share"] = sum(refs) / max(len(refs), 1)
        lc = s.length_curriculum
        if lc is not None:  # seed 003
            out["student_entropy"] = self._entropy
            out["max_new_tokens"] = float(
                run_state.advance_length(self.client, self.cfg.run_id, lc, self._entropy, self.step)
            )
        return out

    def _boundary(self) -> tuple[rs.Desired, bool]:
        """Begin the next step: read stop requests and λ schedules (rank 0), share them with
        rank 0's exit request, so that every rank leaves at the same step."""
        self._check_lease()
        box: list[Any] = [None, None, self._exit_requested]
        if self.rank == 0:
            assert self.client is not None
            desired, timelines = run_state.begin_step(
                self.client, self.cfg.run_id, self.step + 1, self.timelines
            )
            box = [desired, timelines, self._exit_requested]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        self.timelines = box[1]
        return rs.Desired(box[0]), bool(box[2])

    def _finish(self, command: rs.Command) -> rs.RunStatus:
        if self.rank != 0:
            return rs.RunStatus.STOPPED if command is rs.Command.HALT else rs.RunStatus.SUCCEEDED
        assert self.client is not None
        self._checkpoint()
        self.side.flush()  # every step's metrics and weights are out before the run ends
        return run_state.apply(self.client, self.cfg.run_id, command).status

    def _one_step(self) -> None:
        waited = time.perf_counter()
        batch = self._next_batch() if self.rank == 0 else Batch([])
        self.data_wait.step_s += time.perf_counter() - waited
        count = [sum(len(g.members) for g in batch.groups)]
        if self.world > 1:
            dist.broadcast_object_list(count, src=0)
        if count[0] == 0:
            return  # nothing arrived within batch_timeout_s: look at stop requests again
        started = time.perf_counter()
        metrics = self.train_step(self._shard(batch), count[0])
        self.step += 1
        self.version += 1
        if self.rank != 0:
            return
        assert self.consumer is not None and self.client is not None
        self.consumer.mark_applied(batch)
        if self.cfg.audit:
            self.applied_log.append([m.rollout.rollout_id for m in batch.rollouts])
        self._publish()
        if self.step % self.spec.checkpoint_interval == 0:
            self._checkpoint()
        metrics |= self._rollout_option_metrics(batch)
        metrics["tokens_per_s"] = metrics["tokens"] / max(time.perf_counter() - started, 1e-9)
        metrics |= {"step": float(self.step), "gamma": self.spec.objective.gamma}
        metrics |= self.data_wait.close_step()
        metrics |= {
            f"{rs.LAMBDA_PREFIX}{r.name}": lam
            for r, lam in zip(self.spec.rewards, self._lambdas(self.step), strict=True)
        }
        versions, version = [m.rollout.policy_version for m in batch.rollouts], self.version
        self.side.submit(lambda: self._write_metrics(metrics, versions, version))
        log.info("step %d: loss %.4f kl %.4f", self.step, metrics["loss"], metrics["dense_kl"])

    def run(self) -> rs.RunStatus:
        """Train until the spec's last step or a stop request; the final run status."""
        if self.rank == 0:
            assert self.client is not None
            run_state.apply(self.client, self.cfg.run_id, rs.Command.START)
            self._publish_start()
        self.data_wait = DataWait()  # model loading and the first publication are not step time
        try:
            with manual_gc(self.cfg.gc_interval):
                return self._loop()
        finally:
            self.side.close()

    def _loop(self) -> rs.RunStatus:
        try:
            while self.step < self.spec.steps:
                if self.cfg.gc_interval and self.step % self.cfg.gc_interval == 0:
                    gc.collect()  # at a step boundary, not in the middle of a backward pass
                desired, leave = self._boundary()
                if desired is rs.Desired.STOP:
                    return self._finish(rs.Command.HALT)
                if leave:
                    if self.rank == 0:
                        self._checkpoint()
                        self.side.flush()
                    return rs.RunStatus.RUNNING
                self._one_step()
            return self._finish(rs.Command.FINISH)
        except LeaseLostError:
            raise
        except Exception as err:
            if self.rank == 0 and self.client is not None:
                run_state.apply(
                    self.client, self.cfg.run_id, rs.Command.FAIL, error=f"{type(err).__name__}: {err}"
                )
            raise


@torch.no_grad()
def entropy_sum(logits: Tensor, mask: Tensor) -> Tensor:
    """(Σ_t H(π_θ(·|ctx_t)), #tokens) over the masked positions of (B, T, V) logits, float64,
    one row's (T, V) softmax at a time (the length curriculum's gate, seed 003)."""
    total = torch.zeros(2, dtype=torch.float64, device=logits.device)
    for row, keep in zip(logits, mask.to(logits.device), strict=True):
        lp = torch.log_softmax(row[keep].float(), dim=-1)
        total[0] -= (lp.exp() * lp).sum().double()
        total[1] += int(keep.sum())
    return total


@contextlib.contextmanager
def manual_gc(interval: int) -> Iterator[None]:
    """Python's cyclic GC off while training (``interval`` > 0): the Redis and protobuf path leaves
    many small objects, and automatic collections then land inside forward/backward passes
    (benchmarks/bench_learner.py). Reference counting still frees almost everything; the loop
    collects every ``interval`` steps at a boundary."""
    if not interval or not gc.isenabled():
        yield
        return
    gc.freeze()  # the model, tokenizer and imports are long-lived: never scan them again
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class LeaseLostError(RuntimeError):
    """This learner no longer holds the run (it was frozen past its lease and replaced)."""


def _gi(rollout: Any) -> int:
    return int(rollout.group_index)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
