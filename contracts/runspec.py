"""The run spec: everything a user states to start a distillation run (pydantic, validated at the edge).

The control plane validates a spec with these models and stores it in Redis as JSON; the learner
and the rollout workers read it back with ``RunSpec.model_validate_json``. Pure pydantic: the
control plane never imports torch. Symbols follow seed 000 (γ, λ, α, K); see SPEC.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.schedules import ConstantSchedule, ScheduleSpec

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]

# Names the learner's registries serve; tests check these lists against the registries.
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
BASELINES = ("none", "leave_one_out")
NORMALIZATIONS = ("sum_over_k", "per_token_mean")
SUPPORTS = ("full", "student_top_k", "teacher_top_k", "union")


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
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = "reverse_kl"  # dense term
    jsd_beta: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] = 0.5  # GKD's β, jsd only
    baseline: Literal["none", "leave_one_out"] = "none"  # subtracted from G in the sparse term
    normalization: Literal["sum_over_k", "per_token_mean"] = "sum_over_k"  # Algorithm 1 line 18
    support: Literal["full", "student_top_k", "teacher_top_k", "union"] = "student_top_k"  # B.2
    top_k: Annotated[int, Field(ge=1, le=1024)] = 32  # K of the support, and teacher top-K asked for


class SamplingSpec(_Spec):
    responses_per_prompt: Annotated[int, Field(ge=1, le=256)] = 4  # K of Algorithm 1
    prompts_per_step: Annotated[int, Field(ge=1, le=4096)] = 8  # prompt groups per optimizer step
    temperature: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1, le=32768)] = 64


class OptimizerSpec(_Spec):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    grad_clip: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0  # max global grad norm


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
        if self.objective.baseline == "leave_one_out" and self.sampling.responses_per_prompt < 2:
            raise ValueError("objective.baseline: leave_one_out needs sampling.responses_per_prompt >= 2")
        return self
