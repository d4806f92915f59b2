"""The rollout worker: lease a prompt, sample K responses, score them, publish the group.

One loop per process (``python -m services.rollout --run-id ID``)::

    lease a prompt (waits while the learner lags: backpressure)
    → reload the student if the learner published newer weights
    → sample K responses (a services.rollout.sampler: hf or vllm), with the student's top-K ids;
      or, for the share 1 − sampling.on_policy_fraction of prompts, K copies of the dataset's
      reference response; flawed samples (sampling.max_perplexity) are dropped and resampled
    → ask every teacher of the run concurrently, then the reward service
    → publish the K records as one group (all or nothing, idempotent)

Prompts are leased, sampled, scored and published a batch at a time (``--prompts-per-batch``),
and two batches overlap: one is sampled while the one before waits for its scores.
A teacher that is down makes the worker retry the same group's scoring with backoff: nothing
partial ever reaches the stream. The lease is renewed while the group is being worked on, so a
slow worker keeps its prompt and a dead one's prompt is handed to another worker when the lease
runs out. Stopped (SIGTERM) while it retries, a worker leaves its prompts to lapse that way; when
the run has ended meanwhile, it drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis.asyncio
from grpc import aio
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from contracts import keys, runstate
from contracts.rollout_record import Reward as RecordReward
from contracts.rollout_record import TeacherArrays, build_rollout
from contracts.runspec import RunSpec, on_policy_share
from proto.distill.v1 import reward_pb2, rollout_pb2
from services.reward.client import RewardClient
from services.reward.domain import Item, Status
from services.rollout.dataset import Prompt, load_dataset, require_reference
from services.rollout.queue import LeaseLost, ProducerConfig, PromptLease, RolloutProducer
from services.rollout.sampler import HfSampler, Sampler, make_sampler
from services.rollout.sampling import (
    Sample,
    SamplingConfig,
    from_reference,
    perplexity,
    split_flawed,
    teacher_forced,
)
from services.rollout.vllm_sampling import VllmSamplerConfig
from services.teacher.client import TeacherClient, make_item, score_all
from services.teacher.domain import ItemScores, TeacherError
from services.teacher.fingerprint import fingerprint

log = logging.getLogger(__name__)

_STATUS = {
    Status.OK: reward_pb2.REWARD_STATUS_OK,
    Status.ERROR: reward_pb2.REWARD_STATUS_ERROR,
    Status.TIMEOUT: reward_pb2.REWARD_STATUS_TIMEOUT,
    Status.UNAVAILABLE: reward_pb2.REWARD_STATUS_UNAVAILABLE,
}


@dataclass
class WorkerConfig:
    run_id: str
    worker_id: str
    reward_address: str | None = None  # the reward service (needed when the run has rewards)
    teacher_token: str | None = None  # bearer token for the teacher services
    reward_token: str | None = None
    device: str = "cpu"  # torch device of the hf sampler
    sampler: str = "hf"  # "hf" (a transformers model) or "vllm" (GPU); see services.rollout.sampler
    vllm: VllmSamplerConfig = field(default_factory=VllmSamplerConfig)  # used when sampler == "vllm"
    teacher_deadline_s: float = 60.0  # per Score call
    reward_timeout_s: float = 30.0  # per verified item
    retry_backoff_s: float = 1.0  # wait between tries of a group whose teachers or rewards failed
    # Prompts leased and sampled together (one sampler call, one Score call per teacher, one Verify
    # call): small models are dominated by per-call overhead. 0 = the run's prompts_per_step.
    prompts_per_batch: int = 0
    lease_ttl_s: float = 120.0  # a prompt not published or renewed within this goes to another worker
    seed: int = 0


@dataclass
class _Student:
    sampler: Sampler
    tokenizer: PreTrainedTokenizerBase
    version: int = -1  # policy version of the loaded weights (-1: the initial checkpoint)


@dataclass
class _Run:
    spec: RunSpec
    prompts: list[Prompt]
    teachers: dict[str, TeacherClient] = field(default_factory=dict)
    rewards: RewardClient | None = None


@dataclass(frozen=True)
class _Plan:
    """How one leased prompt is answered, decided once per lease (a retried group keeps it)."""

    reference: bool  # K copies of the dataset's reference response instead of student samples
    max_new_tokens: int  # the length limit in effect (the length curriculum's, when it is on)


@dataclass
class _Drawn:
    """Leased prompts with their responses, waiting to be scored and published."""

    leases: list[PromptLease]
    plans: list[_Plan]
    responses: list[list[Sample]]  # per lease: K samples, or the reference once
    version: int  # the policy version the samples come from
    keepers: list[asyncio.Task[None]] = field(default_factory=list)  # renew the leases meanwhile


_FIRST_WAIT_S = 0.005  # the first backoff when the learner lags; doubles up to poll_s


def sampling_rng(run_seed: int, worker_seed: int) -> np.random.Generator:
    """The worker's sampling seeds: from the run's seed and the worker's, so a run is reproducible
    and its workers draw different samples."""
    return np.random.default_rng([run_seed, worker_seed])


def _support_needs_student_top_k(spec: RunSpec) -> bool:
    return bool(spec.teachers) and spec.objective.support in ("student_top_k", "union")


def _candidates(spec: RunSpec, s: Sample, vocab: int) -> np.ndarray:
    """Ids each teacher scores at every position: the student's top-K, or all ids for full support.

    The record stores them as its ``student_top_ids`` (the candidates' ids), so that every
    teacher's ``candidate_logprobs`` lines up with them.
    """
    if spec.objective.support == "full":
        return np.broadcast_to(np.arange(vocab), (len(s.response_ids), vocab))
    if spec.objective.support in ("student_top_k", "union"):
        return s.top_k_ids.astype(np.int64)
    return np.zeros((len(s.response_ids), 0), np.int64)


class RolloutWorker:
    def __init__(self, cfg: WorkerConfig, client: redis.asyncio.Redis) -> None:
        self.cfg = cfg
        self.client = client
        self.rng = np.random.default_rng(cfg.seed)

    async def _load_run(self, stop: asyncio.Event) -> tuple[_Run, _Student]:
        raw = await self.client.get(runstate.run_spec_key(self.cfg.run_id))
        if raw is None:
            raise RuntimeError(f"run {self.cfg.run_id}: no spec in Redis; create the run first")
        spec = RunSpec.model_validate_json(raw)
        self.rng = sampling_rng(spec.seed, self.cfg.seed)
        run = _Run(spec, load_dataset(Path(spec.dataset)))
        if spec.sampling.mixes_references:
            require_reference(run.prompts, spec.sampling.reference_field)
        tokenizer = AutoTokenizer.from_pretrained(spec.student)
        sampler = await asyncio.to_thread(
            make_sampler, self.cfg.sampler, spec.student, self.cfg.device, self.cfg.vllm
        )
        if (
            spec.sampling.mixes_references
            and _support_needs_student_top_k(spec)
            and not isinstance(sampler, HfSampler)
        ):
            # The student's top-K on a given response needs a forward pass that only the hf sampler offers.
            raise RuntimeError(
                "sampling.on_policy_fraction: reference responses with the student's top-K support "
                f"need --sampler hf (this worker runs {self.cfg.sampler!r})"
            )
        student = _Student(sampler, tokenizer)
        expected = fingerprint(tokenizer)
        for ref in spec.teachers:
            run.teachers[ref.name] = await self._teacher(ref.name, expected, stop)
        if spec.rewards:
            if self.cfg.reward_address is None:
                raise RuntimeError("reward_address: the run has rewards, pass --reward-address")
            run.rewards = RewardClient(self.cfg.reward_address, self.cfg.reward_token)
        return run, student

    async def _teacher(self, name: str, expected_fingerprint: str, stop: asyncio.Event) -> TeacherClient:
        """A client of the registered teacher whose tokenizer matches the student's. A teacher that
        is down is waited for, as during the run, until it is back, the run ends or ``stop`` is set."""
        raw = await self.client.hget(runstate.teachers_key(), name)
        if raw is None:
            raise RuntimeError(f"teachers: {name!r} is not registered (POST /v1/teachers)")
        address = json.loads(raw)["address"]
        teacher = TeacherClient(
            [address], token=self.cfg.teacher_token, deadline_s=self.cfg.teacher_deadline_s
        )
        while True:
            try:
                await teacher.check_fingerprint(expected_fingerprint)
                return teacher
            except aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or stop.is_set() or await self._run_over():
                    raise
                wait = self.cfg.retry_backoff_s
                log.warning("teacher %r at %s is unavailable; retrying in %.1f s", name, address, wait)
                await asyncio.sleep(wait)

    async def _refresh_weights(self, student: _Student) -> None:
        version = await self.client.get(keys.policy_version(self.cfg.run_id))
        if version is None or int(version) <= student.version:
            return
        path = await self.client.hget(keys.policy_weights(self.cfg.run_id), "path")
        if path is None:
            return
        await asyncio.to_thread(student.sampler.load_weights, _text(path))
        student.version = int(version)
        log.info("loaded policy version %d", student.version)

    def _sampling(self, spec: RunSpec, student: _Student, max_new_tokens: int) -> SamplingConfig:
        s = spec.sampling
        tok = student.tokenizer
        return SamplingConfig(
            responses_per_prompt=s.responses_per_prompt,
            temperature=s.temperature,
            max_new_tokens=max_new_tokens,
            record_top_k=spec.objective.top_k if _support_needs_student_top_k(spec) else 0,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )

    async def _scores(self, run: _Run, samples: list[Sample], vocab: int) -> dict[str, list[ItemScores]]:
        if not run.teachers:
            return {}
        items = [
            make_item(s.prompt_ids + s.response_ids, len(s.prompt_ids), _candidates(run.spec, s, vocab))
            for s in samples
        ]
        # The teacher's top-K: the support itself, or the list SelecTKD's greedy_top_k checks against.
        asks = run.spec.objective.support in ("teacher_top_k", "union", "teacher_top_p")
        top_k = run.spec.objective.top_k if asks or run.spec.objective.selective == "greedy_top_k" else 1
        started = time.monotonic()
        scores = await score_all(run.teachers, items, top_k=top_k, dtype="float32")
        await self._count(teacher_latency_s_sum=time.monotonic() - started, teacher_calls=1)
        return scores

    async def _count(self, **values: float) -> None:
        """Add to the run's producer counters (the learner turns them into per-step metrics)."""
        key = keys.producer_counters(self.cfg.run_id)
        async with self.client.pipeline(transaction=True) as pipe:  # a reader sees all or none
            for name, value in values.items():
                pipe.hincrbyfloat(key, name, value)
            await pipe.execute()

    async def _rewards(self, run: _Run, answered: list[tuple[Prompt, str]]) -> list[list[RecordReward]]:
        """Rewards of each (prompt, response text), in one Verify call."""
        if run.rewards is None:
            return [[] for _ in answered]
        verifiers = tuple(dict.fromkeys(r.verifier for r in run.spec.rewards))
        items = [Item(prompt.text, t, prompt.reference, verifiers) for prompt, t in answered]
        results = await run.rewards.verify(items, timeout_s=self.cfg.reward_timeout_s)
        timeouts = sum(x.status == Status.TIMEOUT for item in results for x in item)
        if timeouts:
            await self._count(reward_timeouts=timeouts)
        wanted = {r.name for r in run.spec.rewards}
        return [
            [RecordReward(x.name, x.value if x.status == Status.OK else 0.0, _STATUS[x.status], x.detail)
             for x in item if x.name in wanted]
            for item in results
        ]  # fmt: skip

    async def _plans(self, spec: RunSpec, leases: list[PromptLease]) -> list[_Plan]:
        """Reference or samples, and the length limit, for each lease (read from Redis once)."""
        share = 1.0
        if spec.sampling.mixes_references:
            step = await self.client.hget(runstate.run_state_key(self.cfg.run_id), "step")
            share = on_policy_share(spec.sampling.on_policy_fraction, int(_text(step)) if step else 0)
        limit = await self._max_new_tokens(spec)
        return [
            _Plan(share < 1.0 and from_reference(spec.seed, x.prompt_id, x.attempt, share), limit)
            for x in leases
        ]

    async def _max_new_tokens(self, spec: RunSpec) -> int:
        """sampling.max_new_tokens, or the length curriculum's current limit (the learner sets it)."""
        lc = spec.sampling.length_curriculum
        if lc is None:
            return spec.sampling.max_new_tokens
        return lc.limit(await self.client.hget(keys.length_curriculum(self.cfg.run_id), "max_new_tokens"))

    async def _draw(
        self, student: _Student, prompts: list[list[int]], cfg: SamplingConfig
    ) -> list[list[Sample]]:
        """K samples of each prompt, in one sampler call; one list per prompt."""
        if not prompts:
            return []
        seed = int(self.rng.integers(2**31))
        samples = await asyncio.to_thread(student.sampler.sample, prompts, cfg, seed)
        groups: list[list[Sample]] = [[] for _ in prompts]
        for x in samples:
            groups[x.prompt_index].append(x)
        return groups

    async def _filter_flawed(self, spec: RunSpec, student: _Student, prompt_ids: list[int],
                             cfg: SamplingConfig, samples: list[Sample]) -> list[Sample]:  # fmt: skip
        """With sampling.max_perplexity, flawed samples are dropped and resampled (seed 002 ch. 7)
        for at most max_resamples rounds. When the bound is hit, the least flawed of the dropped
        samples fill the group (a group is K responses) and are counted."""
        limit, want = spec.sampling.max_perplexity, cfg.responses_per_prompt
        if limit is None:
            return samples
        kept, flawed = split_flawed(samples, limit)
        for _ in range(spec.sampling.max_resamples):
            if len(kept) == want:
                break
            more = await self._draw(
                student, [prompt_ids], dataclasses.replace(cfg, responses_per_prompt=want - len(kept))
            )
            ok, bad = split_flawed(more[0], limit)
            kept, flawed = kept + ok, flawed + bad
        short = want - len(kept)
        flawed.sort(key=lambda x: perplexity(x.behaviour_logprobs))
        kept += flawed[:short]
        if flawed:
            await self._count(rejected_flawed=len(flawed) - short, flawed_kept=short)
        return kept

    async def _reference(self, run: _Run, student: _Student, prompt: Prompt, prompt_ids: list[int],
                         cfg: SamplingConfig) -> Sample:  # fmt: skip
        """The dataset's reference response (reference_field, tokenized on its own, + EOS, cut at the
        length limit like a sample), recorded by a teacher-forced pass of the student when the
        sampler can run one (the hf sampler; _load_run refuses a support that needs it otherwise)."""
        text = prompt.reference[run.spec.sampling.reference_field]
        ids = list(student.tokenizer.encode(text, add_special_tokens=False))
        if cfg.eos_token_id is not None:
            ids.append(cfg.eos_token_id)
        ids = ids[: cfg.max_new_tokens]
        if not ids:
            raise ValueError(f"{run.spec.sampling.reference_field}: {text!r} has no tokens")
        if isinstance(student.sampler, HfSampler):
            return await asyncio.to_thread(teacher_forced, student.sampler.model, prompt_ids, ids, cfg)
        empty = np.zeros((len(ids), 0), np.int32)
        return Sample(0, 0, list(prompt_ids), ids, np.zeros(0, np.float32), empty)

    async def _responses(
        self, run: _Run, student: _Student, leases: list[PromptLease], plans: list[_Plan], cfg: SamplingConfig
    ) -> tuple[list[list[Sample]], int]:
        """Each lease's scored responses: K student samples (all prompts in one sampler call), or
        the reference once (published as the group's K identical members); and the policy version
        that produced them."""
        prompts = [run.prompts[x.dataset_index] for x in leases]
        ids = [student.tokenizer.encode(p.text) for p in prompts]
        on_policy = [i for i, plan in enumerate(plans) if not plan.reference]
        await self._refresh_weights(student)
        version = max(student.version, 0)  # the weights these samples come from
        drawn = await self._draw(student, [ids[i] for i in on_policy], cfg)
        by_prompt = dict(zip(on_policy, drawn, strict=True))
        out = []
        for i, prompt in enumerate(prompts):
            if i in by_prompt:
                out.append(await self._filter_flawed(run.spec, student, ids[i], cfg, by_prompt[i]))
            else:
                out.append([await self._reference(run, student, prompt, ids[i], cfg)])
        return out, version

    async def _drawn(self, run: _Run, student: _Student, leases: list[PromptLease]) -> _Drawn:
        """The leased prompts' responses (samples, or references), not yet scored."""
        plans = await self._plans(run.spec, leases)
        cfg = self._sampling(run.spec, student, plans[0].max_new_tokens)
        responses, version = await self._responses(run, student, leases, plans, cfg)
        return _Drawn(leases, plans, responses, version)

    async def _groups(self, run: _Run, student: _Student, d: _Drawn) -> list[list[rollout_pb2.Rollout]]:
        """The records of every drawn prompt: one Score call per teacher and one Verify call."""
        flat = [x for group in d.responses for x in group]
        decode = student.tokenizer.decode
        answered = [
            (run.prompts[lease.dataset_index], str(decode(x.response_ids, skip_special_tokens=True)))
            for lease, group in zip(d.leases, d.responses, strict=True) for x in group
        ]  # fmt: skip
        vocab = student.sampler.vocab_size
        scores, rewards = await asyncio.gather(self._scores(run, flat, vocab), self._rewards(run, answered))
        out, start = [], 0
        for lease, plan, group in zip(d.leases, d.plans, d.responses, strict=True):
            rows = range(start, start + len(group))
            members = [(flat[r], r) for r in rows]
            out.append(self._records(run, student, (lease, plan, d.version), members, scores, rewards))
            start += len(group)
        return out

    def _records(self, run: _Run, student: _Student, what: tuple[PromptLease, _Plan, int],
                 members: list[tuple[Sample, int]], scores: dict[str, list[ItemScores]],
                 rewards: list[list[RecordReward]]) -> list[rollout_pb2.Rollout]:  # fmt: skip
        """One group's K records (lease, plan, policy version of the samples); ``members`` pairs each
        scored sample with its row in scores/rewards."""
        (lease, plan, version), spec, vocab = what, run.spec, student.sampler.vocab_size
        k = spec.sampling.responses_per_prompt
        sources = [members[0]] * k if plan.reference else members  # group member -> scored sample
        return [
            build_rollout(
                run_id=self.cfg.run_id,
                prompt_id=lease.prompt_id,
                group_index=g,
                group_size=k,
                attempt=lease.attempt,
                dataset_index=lease.dataset_index,
                policy_version=version,
                token_ids=np.asarray(x.prompt_ids + x.response_ids, np.int32),
                response_start=len(x.prompt_ids),
                sampled_logprobs=x.behaviour_logprobs,
                student_top_ids=_candidates(spec, x, vocab) if spec.teachers else None,
                teachers=[_teacher_arrays(name, scores[name][row]) for name in scores],
                rewards=rewards[row],
                worker_id=self.cfg.worker_id,
                created_unix=time.time(),
                from_reference=plan.reference,
            )
            for g, (x, row) in enumerate(sources)
        ]

    async def _keep_lease(self, producer: RolloutProducer, lease: PromptLease) -> None:
        while True:
            await asyncio.sleep(producer.config.lease_ttl_s / 3)
            await producer.renew(lease)

    async def _publish(self, run: _Run, student: _Student, producer: RolloutProducer, d: _Drawn,
                       stop: asyncio.Event) -> int:  # fmt: skip
        """Score and publish drawn groups (a teacher or the reward service down: retry the scoring,
        publish nothing partial, until it is back, the run ends or ``stop`` is set); returns the
        number published. Ends the leases' renewal."""
        try:
            while True:
                try:
                    groups = await self._groups(run, student, d)
                    break
                except (aio.AioRpcError, TeacherError, ConnectionError) as err:
                    if any(k.done() for k in d.keepers):
                        raise
                    if stop.is_set() or await self._run_over():
                        # the leases lapse and the prompts go to another worker, or to this one restarted
                        log.warning("%d prompts: %s; stopping without them", len(d.leases), err)
                        return 0
                    wait = self.cfg.retry_backoff_s
                    log.warning("%d prompts: %s; retrying in %.1f s", len(d.leases), err, wait)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
            published = 0
            for lease, records in zip(d.leases, groups, strict=True):
                try:
                    await producer.publish(lease, records)
                    published += 1
                except LeaseLost as err:  # another worker has this prompt now; the others still count
                    log.warning("%s; moving on", err)
            return published
        finally:
            for k in d.keepers:
                k.cancel()

    async def _draw_leased(
        self, run: _Run, student: _Student, producer: RolloutProducer, leases: list[PromptLease]
    ) -> _Drawn:
        keepers = [asyncio.create_task(self._keep_lease(producer, x)) for x in leases]
        try:
            drawn = await self._drawn(run, student, leases)
        except BaseException:
            for k in keepers:
                k.cancel()
            raise
        drawn.keepers = keepers
        return drawn

    async def _run_over(self) -> bool:
        status = await self.client.hget(runstate.run_state_key(self.cfg.run_id), "status")
        # A stopped run may be resumed: its workers wait (backpressure) instead of leaving.
        return _text(status) in (runstate.RunStatus.SUCCEEDED, runstate.RunStatus.FAILED)

    async def run(self, stop: asyncio.Event, poll_s: float = 0.2) -> int:
        """Work until the run ends or ``stop`` is set; returns the number of groups published.

        Two batches overlap: while one batch waits for its teacher scores and rewards and is
        published, the next is leased and sampled (the staleness bound still limits what is leased).
        """
        run, student = await self._load_run(stop)
        spec = run.spec
        producer = RolloutProducer(
            self.client,
            ProducerConfig(
                run_id=self.cfg.run_id, group_size=spec.sampling.responses_per_prompt,
                groups_per_step=spec.sampling.prompts_per_step, max_staleness=spec.max_staleness,
                dataset_size=len(run.prompts), lease_ttl_s=self.cfg.lease_ttl_s,
            ),
        )  # fmt: skip
        batch = self.cfg.prompts_per_batch or spec.sampling.prompts_per_step
        published, wait = 0, _FIRST_WAIT_S
        publishing: asyncio.Task[int] | None = None  # the previous batch, being scored and published
        try:
            while not stop.is_set() and not await self._run_over():
                leases, _ = await producer.try_lease_many(batch)
                if not leases and publishing is not None:  # publishing it may be what frees capacity
                    published += await publishing
                    publishing = None
                    continue
                if not leases:  # the learner lags by max_staleness versions: wait, drop nothing
                    await asyncio.sleep(wait)
                    # short waits first: a fast learner frees capacity within milliseconds
                    wait = min(2 * wait, poll_s)
                    continue
                wait = _FIRST_WAIT_S
                drawn = await self._draw_leased(run, student, producer, leases)
                if publishing is not None:
                    published += await publishing
                publishing = asyncio.create_task(self._publish(run, student, producer, drawn, stop))
            if publishing is not None:
                published += await publishing
                publishing = None
        finally:
            if publishing is not None:
                publishing.cancel()
        return published


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _teacher_arrays(name: str, s: ItemScores) -> TeacherArrays:
    return TeacherArrays(
        teacher=name, token_logprobs=s.token_logprobs, top_ids=s.top_ids,
        top_logprobs=s.top_logprobs, candidate_logprobs=s.candidate_logprobs,
    )  # fmt: skip
