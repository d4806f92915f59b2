"""The run spec: everything a user states to start a distillation run (pydantic, validated at the edge).

The control plane validates a spec with these models and stores it in Redis as JSON; the learner
and the rollout workers read it back with ``RunSpec.model_validate_json``. Pure pydantic: the
control plane never imports torch. Symbols follow seed 000 (γ, λ, α, K); see SPEC.md.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.schedules import ConstantSchedule, CosineSchedule, PiecewiseSchedule, Schedule, ScheduleSpec

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]

# Names the learner's registries serve; tests check these lists against the registries.
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "kl_mix")
BASELINES = ("none", "leave_one_out")
NORMALIZATIONS = ("sum_over_k", "per_token_mean")
SUPPORTS = ("full", "student_top_k", "teacher_top_k", "union", "teacher_top_p")
LR_SCHEDULES = ("constant", "linear", "cosine")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherRef(_Spec):
    name: Name  # a teacher registered with the control plane (POST /v1/teachers)
    weight: Annotated[float, Field(ge=0.0, le=1e3, allow_inf_nan=False)] = 1.0  # α_m of eq. 14


class RewardRef(_Spec):
    name: Name  # the reward's name, as the verifier reports it
    verifier: Name  # a built-in verifier name or one registered with POST /v1/verifiers
    schedule: ScheduleSpec = ConstantSchedule(kind="constant", value=1.0)  # λ_n(step), eq. 15
    # What a failed or timed-out verification counts as. None: the prompt group is dropped from
    # the gradient (dead-lettered, counted); a number: that value, explicitly (and counted).
    failure_value: Annotated[float | None, Field(allow_inf_nan=False)] = None


class ObjectiveSpec(_Spec):
    gamma: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0  # γ of eq. 12
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "kl_mix"] = "reverse_kl"  # dense term
    jsd_beta: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = 0.5  # GKD's β, jsd only
    # KL mixing (seed 003, abstract: "KL mixing"), kl_mix only: the dense term is
    # D = w·KL(teacher‖student) + (1−w)·KL(student‖teacher); w = 1 is forward_kl, w = 0 reverse_kl.
    kl_mix_forward_weight: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.5
    baseline: Literal["none", "leave_one_out"] = "none"  # subtracted from G in the sparse term
    normalization: Literal["sum_over_k", "per_token_mean"] = "sum_over_k"  # Algorithm 1 line 18
    # B.2; teacher_top_p: seed 004 Definition 1 (eq. 7), the smallest set of the teacher's top-K
    # tokens whose cumulative teacher probability is >= top_p, so its size varies per position.
    # top_k caps it: when the K tokens hold less than top_p, all K are kept.
    support: Literal["full", "student_top_k", "teacher_top_k", "union", "teacher_top_p"] = "student_top_k"
    top_k: Annotated[int, Field(ge=1, le=1024)] = 32  # K of the support, and teacher top-K asked for
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.8  # teacher_top_p only
    # Token importance (seed 002 ch. 7, pillar 1): w_t = (1 − H_teacher(t)/log V)·KL(teacher‖student)_t,
    # a stop-gradient. "weight": the dense term at t is multiplied by w_t; "threshold": tokens with
    # w_t >= token_importance_threshold keep their dense term, the others drop it (the seed's
    # TRAIN/skip rule, threshold 0.30 in its worked example). On a top-K support H and KL are taken
    # on the teacher's and student's distributions renormalized over the support; with several
    # teachers w_t is the α-weighted mean of theirs (learner/token_weights.py).
    token_importance: Literal["off", "weight", "threshold"] = "off"
    token_importance_threshold: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.3
    # SelecTKD (seed 001, appendix E, proof of Theorem 2): a position is accepted when
    # greedy_top_k: the student's argmax is among the teacher's top selective_k tokens;
    # spec_k: at least one of selective_k candidates sampled from the student passes the
    # speculative acceptance test u < min(1, p_teacher(y)/q_student(y)). The dense term is weighted
    # 1 at accepted positions and selective_beta at rejected ones (k = 5, β = 0.01: its table 6).
    # With several teachers a position must pass against each. greedy_top_k on a top-K support
    # asks the teachers for their top_k tokens (selective_k <= top_k).
    selective: Literal["off", "greedy_top_k", "spec_k"] = "off"
    selective_k: Annotated[int, Field(ge=1, le=1024)] = 5
    selective_beta: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.01

    @model_validator(mode="after")
    def _check_selective(self) -> ObjectiveSpec:
        if self.selective == "greedy_top_k" and self.support != "full" and self.selective_k > self.top_k:
            raise ValueError(
                f"objective.selective_k: {self.selective_k} exceeds objective.top_k {self.top_k}, "
                "the teacher's top-K list greedy_top_k checks against"
            )
        return self


class LengthCurriculumSpec(_Spec):
    """Entropy-gated length curriculum (seed 003, abstract: "entropy-gated length curriculum").

    The response length limit starts at ``start``; after each learner step whose mean per-token
    student entropy (nats, over the batch's response tokens) is below ``gate``, it grows by
    ``step``, up to ``max`` (at most ``sampling.max_new_tokens``).
    """

    start: Annotated[int, Field(ge=1, le=32768)]
    step: Annotated[int, Field(ge=1, le=32768)]
    gate: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]  # nats per token
    max: Annotated[int, Field(ge=1, le=32768)]

    @model_validator(mode="after")
    def _check(self) -> LengthCurriculumSpec:
        if self.start > self.max:
            raise ValueError(f"length_curriculum.start: {self.start} exceeds max {self.max}")
        return self

    def limit(self, stored: bytes | str | int | None) -> int:
        """The length limit in effect: the one the learner stored (a Redis value; kept within
        [1, max]), else start."""
        return self.start if stored is None else min(max(int(stored), 1), self.max)


class SamplingSpec(_Spec):
    responses_per_prompt: Annotated[int, Field(ge=1, le=256)] = 4  # K of Algorithm 1
    prompts_per_step: Annotated[int, Field(ge=1, le=4096)] = 8  # prompt groups per optimizer step
    temperature: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = 64
    # GKD's λ (seed 002 ch. 4, π_mix = λ·p_θ + (1−λ)·p_data; seed 003's "prefix source" axis): the
    # share of prompts answered by student samples; the others get the dataset's reference response
    # (reference_field), kept out of the sparse term. A schedule over learner steps, like λ_n of the
    # rewards, in [0, 1]; a rising linear ramp holds at 1. Default constant 1: all on-policy.
    on_policy_fraction: ScheduleSpec = ConstantSchedule(kind="constant", value=1.0)
    # The dataset field whose text (+ EOS) is the reference response of on_policy_fraction.
    reference_field: Annotated[str, Field(min_length=1, max_length=128)] = "answer"
    # Flawed-prefix rejection (seed 002 ch. 7, pillar 3): a student response whose perplexity under
    # the student, exp(mean −log π_old(y_t)) at the sampling temperature, exceeds this is dropped
    # and resampled, for at most max_resamples rounds per group. None: off.
    max_perplexity: Annotated[float, Field(gt=1.0, allow_inf_nan=False)] | None = None
    max_resamples: Annotated[int, Field(ge=0, le=16)] = 2
    length_curriculum: LengthCurriculumSpec | None = None  # seed 003; None: max_new_tokens throughout

    @model_validator(mode="after")
    def _check_options(self) -> SamplingSpec:
        top = _schedule_max(self.on_policy_fraction)
        if top > 1.0:
            raise ValueError(f"on_policy_fraction: a share in [0, 1], the schedule reaches {top}")
        if self.reference_field == "prompt":
            raise ValueError("reference_field: 'prompt' is the prompt, not a reference response")
        lc = self.length_curriculum
        if lc is not None and lc.max > self.max_new_tokens:
            raise ValueError(
                f"length_curriculum.max: {lc.max} exceeds sampling.max_new_tokens {self.max_new_tokens}"
            )
        return self

    @property
    def mixes_references(self) -> bool:
        """Whether some prompts get the dataset's reference (on_policy_fraction is not constant 1)."""
        return self.on_policy_fraction != ConstantSchedule(kind="constant", value=1.0)


def on_policy_share(schedule: Schedule, step: int) -> float:
    """GKD's λ at learner ``step`` (seed 002 ch. 4): the share of prompts answered by the student.

    Held at 1 where a rising schedule passes it (the run spec refuses schedules that start above 1).
    """
    return min(1.0, schedule.at(max(step, 0)))


def _schedule_max(schedule: Schedule) -> float:
    """The largest value a share schedule takes; a rising linear ramp counts from its start (it is
    held at 1 where it passes 1, see on_policy_share)."""
    if isinstance(schedule, PiecewiseSchedule):
        return max(schedule.values)
    if isinstance(schedule, CosineSchedule):
        return max(schedule.start, schedule.end)
    return schedule.at(0)


class OptimizerSpec(_Spec):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    grad_clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0  # max global grad norm
    # lr over the run, as transformers' schedulers of these names: rising from 0 over warmup_steps,
    # then held (constant) or falling to 0 at the run's last step (linear, cosine)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0


def lr_at(o: OptimizerSpec, done: int, steps: int) -> float:
    """The learning rate of the optimizer step that follows ``done`` steps of a ``steps``-step run."""
    if done < o.warmup_steps:
        return o.lr * done / o.warmup_steps  # transformers too spends its first step at lr 0
    if o.schedule == "constant":
        return o.lr
    progress = (done - o.warmup_steps) / max(1, steps - o.warmup_steps)
    if o.schedule == "linear":
        return o.lr * max(0.0, 1.0 - progress)
    return o.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class RunSpec(_Spec):
    name: Name | None = None  # a label for listings; the control plane generates the run id
    student: Annotated[str, Field(min_length=1)]  # local path or hub name of the student model
    # sha256 tokenizer fingerprint of the student (services/teacher/fingerprint.py), when the user
    # knows it: every teacher of the run must report the same one. The control plane computes none
    # itself (it never loads a tokenizer); without it, the teachers must agree with each other.
    student_fingerprint: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    dataset: Annotated[str, Field(min_length=1)]  # JSONL with "prompt" and reference fields
    teachers: list[TeacherRef] = []  # none: pure RL (table 5.5)
    rewards: list[RewardRef] = []  # none: pure distillation
    objective: ObjectiveSpec = ObjectiveSpec()
    sampling: SamplingSpec = SamplingSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    steps: Annotated[int, Field(ge=1, le=10_000_000)] = 100
    checkpoint_interval: Annotated[int, Field(ge=1)] = 10  # steps between checkpoints
    max_staleness: Annotated[int, Field(ge=0, le=1000)] = 1  # policy versions a rollout may lag
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError("teachers: each teacher may appear once")
        rewards = [r.name for r in self.rewards]
        if len(set(rewards)) != len(rewards):
            raise ValueError("rewards: each reward name may appear once")
        if not self.teachers and not self.rewards:
            raise ValueError("teachers, rewards: a run needs at least one teacher or one reward")
        if self.optimizer.warmup_steps > self.steps:
            raise ValueError(
                f"optimizer.warmup_steps: {self.optimizer.warmup_steps} is more than the run's "
                f"{self.steps} steps; warm up over fewer steps or run longer"
            )
        if self.objective.baseline == "leave_one_out" and self.sampling.responses_per_prompt < 2:
            raise ValueError("objective.baseline: leave_one_out needs sampling.responses_per_prompt >= 2")
        return self
