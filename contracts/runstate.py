"""The run-state contract: what the control plane, the learner and the rollout workers keep in Redis.

Pure pydantic and key names (no Redis client imported here); every process reads and writes a
run's state through these definitions, so the layout is stated once.

Keys (all of one run under ``distill:run:{run_id}:``, see ``contracts.keys``):

- ``runs_index_key()`` — sorted set of run ids scored by creation time (ms).
- ``run_spec_key(id)`` — string: the ``RunSpec`` as JSON (written once, at creation).
- ``run_state_key(id)`` — hash with the fields of :class:`RunState` (strings): ``status``,
  ``desired``, ``step``, ``created_at``, ``started_at``, ``updated_at``, ``error``, ``name``,
  ``fingerprint``.
- ``run_schedules_key(id)`` — hash: reward name → ``ScheduleTimeline.to_dict()`` as JSON.
- ``run_metrics_key(id)`` — stream: one entry per step written by the learner, fields in
  :data:`METRIC_FIELDS` plus ``reward/<name>`` and ``lambda/<name>``; numbers as decimal strings.
- ``teachers_key()`` / ``verifiers_key()`` — hashes: name → registration record JSON.
- ``teacher_runs_key(name)`` — set of the run ids that name a teacher (DELETE checks them).
- ``idempotency_key(key)`` — string: ``{"body_sha256", "run_id"}`` JSON, expires after a day.

Lifecycle: ``queued → running → succeeded | failed | stopped``. Users set the *desired* state
(``run`` or ``stop``) with stop/resume; the learner honours it at a step boundary and writes the
status. Every change of (status, desired) goes through :func:`transition`, under a Redis
``WATCH``/``MULTI`` on ``run_state_key`` so that concurrent commands are serialized.

Steps: ``step`` is the step the learner has begun (0 before the first; steps count from 1). The
learner advances ``step`` to t and reads the schedules in one ``MULTI``; a schedule change made
while ``step == s`` is recorded with ``step_from = s + 1`` (under ``WATCH`` on the state key), so
it takes effect exactly at the next step boundary and never rewrites a step already begun.
"""

from __future__ import annotations

import hashlib
import math
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from contracts import keys

__all__ = [
    "METRIC_FIELDS",
    "Command",
    "Desired",
    "InvalidTransition",
    "RunState",
    "RunStatus",
    "idempotency_key",
    "parse_metric_fields",
    "run_learner_key",
    "run_metrics_key",
    "run_schedules_key",
    "run_spec_key",
    "run_state_key",
    "runs_index_key",
    "teacher_runs_key",
    "teachers_key",
    "transition",
    "verifiers_key",
]

# Fields of one metrics stream entry (besides reward/<name> and lambda/<name>). The last two are
# optional, written when the learner aggregates them from the rollout records.
METRIC_FIELDS = (
    "step",
    "loss",
    "dense_kl",
    "sparse",
    "gamma",
    "tokens",  # response tokens trained in this step
    "lr",  # the step's learning rate (optimizer.schedule)
    "tokens_per_s",
    "queue_len",
    "policy_lag",
    "dead_letters",
    "data_wait_s",  # seconds the learner waited for rollouts since its previous step
    "wait_fraction",  # that wait over the step's wall time
    "wait_fraction_total",  # the same since this learner process started
    "teacher_latency_s",  # mean teacher Score latency over the step's rollouts
    "reward_timeouts",  # cumulative verifier timeouts of the run
    # Objective options (contracts.runspec.ObjectiveSpec), written only while the option is on:
    "kl_mix_forward_kl",  # divergence kl_mix: mean per-token KL(teacher‖student) part
    "kl_mix_reverse_kl",  # divergence kl_mix: mean per-token KL(student‖teacher) part
    "token_importance_mean",  # token_importance: mean w_t = (1 − H_teacher/log V)·KL over tokens
    "token_importance_kept",  # token_importance: share of tokens kept (w_t >= threshold; weight: w_t > 0)
    "selectkd_accept_rate",  # selective: SelecTKD's token acceptance rate (TAR)
    "support_size",  # support teacher_top_p: mean number of support tokens per position
    # Sampling options (contracts.runspec.SamplingSpec), written only while the option is on:
    "on_policy_fraction",  # on_policy_fraction: the scheduled share of student-sampled prompts
    "reference_share",  # on_policy_fraction: share of the step's responses that are references
    "rejected_flawed",  # max_perplexity: cumulative flawed student responses dropped and resampled
    "flawed_kept",  # max_perplexity: cumulative flawed responses kept when max_resamples ran out
    "student_entropy",  # length_curriculum: mean per-token student entropy of the step's batch
    "max_new_tokens",  # length_curriculum: the response length limit after this step
)
REWARD_PREFIX = "reward/"
LAMBDA_PREFIX = "lambda/"
IDEMPOTENCY_TTL_S = 24 * 3600


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def terminal(self) -> bool:
        """No learner works on the run (stopped can be resumed, succeeded cannot)."""
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED)


class Desired(StrEnum):
    RUN = "run"
    STOP = "stop"


class Command(StrEnum):
    STOP = "stop"  # user, POST /v1/runs/{id}/stop
    RESUME = "resume"  # user, POST /v1/runs/{id}/resume
    START = "start"  # learner: picked the run up
    HALT = "halt"  # learner: honoured desired=stop at a step boundary
    FINISH = "finish"  # learner: last step done
    FAIL = "fail"  # learner: gave up (error text in the state)


class InvalidTransition(ValueError):
    """``command`` is not allowed in ``status``; the message says why."""

    def __init__(self, status: RunStatus, command: Command) -> None:
        super().__init__(f"cannot {command.value} a run that is {status.value}")
        self.status, self.command = status, command


_S, _D, _C = RunStatus, Desired, Command
# (status, command) -> new status; desired follows the command below. Missing pairs are refused.
_TABLE: dict[tuple[RunStatus, Command], RunStatus] = {
    (_S.QUEUED, _C.STOP): _S.STOPPED,  # no learner holds it yet: stop at once
    (_S.QUEUED, _C.RESUME): _S.QUEUED,
    (_S.QUEUED, _C.START): _S.RUNNING,
    (_S.RUNNING, _C.STOP): _S.RUNNING,  # the learner stops at the next step boundary
    (_S.RUNNING, _C.RESUME): _S.RUNNING,  # cancels a stop not yet honoured
    (_S.RUNNING, _C.START): _S.RUNNING,  # a restarted learner takes its run back
    (_S.RUNNING, _C.HALT): _S.STOPPED,
    (_S.RUNNING, _C.FINISH): _S.SUCCEEDED,
    (_S.RUNNING, _C.FAIL): _S.FAILED,
    (_S.STOPPED, _C.STOP): _S.STOPPED,
    (_S.STOPPED, _C.RESUME): _S.QUEUED,  # a learner resumes it from its last checkpoint
    (_S.FAILED, _C.RESUME): _S.QUEUED,  # retry from the last checkpoint
}
_DESIRED = {_C.STOP: _D.STOP, _C.HALT: _D.STOP, _C.RESUME: _D.RUN, _C.START: _D.RUN}


def transition(status: RunStatus, desired: Desired, command: Command) -> tuple[RunStatus, Desired]:
    """The (status, desired) after ``command``; :class:`InvalidTransition` if not allowed.

    The only place run states change: the control plane (stop/resume) and the learner
    (start/halt/finish/fail) both call it inside a Redis transaction on ``run_state_key``.
    """
    new_status = _TABLE.get((status, command))
    if new_status is None:
        raise InvalidTransition(status, command)
    if command is Command.START and desired is Desired.STOP:
        # A stop that arrived before the learner picked the run up wins.
        raise InvalidTransition(status, command)
    return new_status, _DESIRED.get(command, desired)


class RunState(BaseModel):
    """The decoded ``run_state_key`` hash."""

    model_config = ConfigDict(frozen=True)

    status: RunStatus
    desired: Desired
    step: int  # the step the learner has begun; 0 before the first
    created_at: float  # unix seconds
    updated_at: float
    started_at: float = 0.0  # when a learner first began training it (model loaded); 0 before
    error: str = ""
    name: str = ""
    fingerprint: str = ""  # the tokenizer fingerprint every teacher of the run shares ("" if none)

    def to_hash(self) -> dict[str, str]:
        return {k: str(v.value if isinstance(v, StrEnum) else v) for k, v in self.model_dump().items()}

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> RunState:
        return cls.model_validate(data)


def parse_metric_fields(fields: dict[str, str]) -> dict[str, float | None]:
    """Numbers of one metrics entry; a non-finite or unparsable value is ``None`` (JSON has no NaN)."""
    values: dict[str, float | None] = {}
    for name, raw in fields.items():
        try:
            number = float(raw)
        except ValueError:
            values[name] = None
            continue
        values[name] = number if math.isfinite(number) else None
    return values


def runs_index_key() -> str:
    return keys.runs_index()


def run_spec_key(run_id: str) -> str:
    return keys.run_spec(run_id)


def run_state_key(run_id: str) -> str:
    return f"{keys.PREFIX}:run:{keys.check_run_id(run_id)}:state"


def run_schedules_key(run_id: str) -> str:
    return f"{keys.PREFIX}:run:{keys.check_run_id(run_id)}:schedules"


def run_metrics_key(run_id: str) -> str:
    return keys.metrics_stream(run_id)


def teachers_key() -> str:
    return f"{keys.PREFIX}:teachers"


def verifiers_key() -> str:
    return f"{keys.PREFIX}:verifiers"


def teacher_runs_key(name: str) -> str:
    return f"{keys.PREFIX}:teacher:{name}:runs"


def idempotency_key(key: str) -> str:
    # Hashed: the header is client-chosen text and must not shape our key space.
    return f"{keys.PREFIX}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"


def run_learner_key(run_id: str) -> str:
    """String with a TTL: the holder id of the learner process training the run (a heartbeat).

    A learner in service mode claims a queued run, or a running run whose learner stopped
    heartbeating (killed or frozen), with ``SET NX EX``; it refreshes the key while it trains.
    """
    return f"{keys.PREFIX}:run:{keys.check_run_id(run_id)}:learner"
