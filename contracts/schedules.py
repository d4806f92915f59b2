"""λ schedules for the reward weights of the objective (seed 000, section 5.1) — pure Python.

Owns: the schedule specs (pydantic models, a discriminated union on ``kind``), a registry by
name (``register_schedule`` / ``get_schedule``), and ``ScheduleTimeline``, which records the
schedule changes made while a run goes and evaluates λ at a step. The control plane imports
this module to validate and report schedules, so it must never import torch or numpy.

Kinds (``t`` is the step counted from when the schedule took effect, see ``ScheduleTimeline``):

- ``constant(value)``:               λ(t) = value
- ``linear(lambda0, alpha)``:        λ(t) = max(0, λ0 (1 + α t))   (section 5.1; clamped at 0 so
  that a decaying ramp, α < 0, holds at 0 instead of turning the reward into a penalty)
- ``piecewise(boundaries, values)``: λ(t) = values[i], i = number of boundaries ≤ t
- ``cosine(start, end, steps)``:     λ(t) = end + (start − end)(1 + cos(π min(t, steps)/steps))/2

Every value is finite and ≥ 0 wherever the schedule can be evaluated; a bad spec raises
``pydantic.ValidationError`` (from the models) or ``ScheduleError`` (from ``parse_schedule`` and
the timeline), both naming the field.

Tests: ``.venv/bin/pytest tests/test_schedules.py -q``.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConstantSchedule",
    "CosineSchedule",
    "LinearSchedule",
    "PiecewiseSchedule",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "ScheduleTimeline",
    "get_schedule",
    "parse_schedule",
    "register_schedule",
    "schedule_kinds",
]

# A λ this large is almost certainly a typo (rewards are O(1)); rejecting it keeps λ·r finite.
MAX_LAMBDA = 1e6

NonNegative = Annotated[float, Field(ge=0.0, le=MAX_LAMBDA, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ScheduleError(ValueError):
    """A schedule spec, step or timeline change is invalid; the message names the field."""


class Schedule(BaseModel, ABC):
    """Base of every schedule: frozen, unknown fields rejected, ``at(step)`` ≥ 0."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str

    def at(self, step: int) -> float:
        """λ at ``step`` (steps counted from when this schedule took effect, ≥ 0)."""
        return self._value(_check_step(step, "step"))

    @abstractmethod
    def _value(self, step: int) -> float:
        """λ at ``step``, a valid step; each registered kind defines it."""


_SCHEDULES: dict[str, type[Schedule]] = {}
S = TypeVar("S", bound=type[Schedule])


def register_schedule(kind: str) -> Callable[[S], S]:
    """Class decorator adding a schedule model to the registry under ``kind``."""

    def decorator(cls: S) -> S:
        if kind in _SCHEDULES:
            raise ScheduleError(f"schedule kind {kind!r} is already registered")
        _SCHEDULES[kind] = cls
        return cls

    return decorator


def get_schedule(kind: str) -> type[Schedule]:
    """The schedule model registered under ``kind``; unknown kinds list the valid ones."""
    try:
        return _SCHEDULES[kind]
    except KeyError:
        raise ScheduleError(f"kind: unknown schedule {kind!r}; valid kinds are {schedule_kinds()}") from None


def schedule_kinds() -> list[str]:
    """Registered schedule kinds, sorted."""
    return sorted(_SCHEDULES)


@register_schedule("constant")
class ConstantSchedule(Schedule):
    """λ(t) = value."""

    kind: Literal["constant"] = "constant"
    value: NonNegative

    def _value(self, step: int) -> float:
        return self.value


@register_schedule("linear")
class LinearSchedule(Schedule):
    """λ(t) = max(0, λ0 (1 + α t)), seed 000 section 5.1."""

    kind: Literal["linear"] = "linear"
    lambda0: NonNegative
    alpha: FiniteFloat

    def _value(self, step: int) -> float:
        # Clamped at 0 (documented in the module docstring) and at MAX_LAMBDA so that a long
        # run with a steep ramp never produces inf.
        return min(MAX_LAMBDA, max(0.0, self.lambda0 * (1.0 + self.alpha * step)))


@register_schedule("piecewise")
class PiecewiseSchedule(Schedule):
    """Piecewise constant: values[i] on [boundaries[i-1], boundaries[i])."""

    kind: Literal["piecewise"] = "piecewise"
    boundaries: list[Annotated[int, Field(ge=1)]]
    values: list[NonNegative] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_shape(self) -> PiecewiseSchedule:
        if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ValueError("boundaries must be strictly increasing")
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"values must have len(boundaries) + 1 = {len(self.boundaries) + 1} entries, "
                f"got {len(self.values)}"
            )
        return self

    def _value(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]


@register_schedule("cosine")
class CosineSchedule(Schedule):
    """Cosine from ``start`` at t=0 to ``end`` at t=steps, then held at ``end``."""

    kind: Literal["cosine"] = "cosine"
    start: NonNegative
    end: NonNegative
    steps: int = Field(ge=1)

    def _value(self, step: int) -> float:
        frac = min(step, self.steps) / self.steps
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


# For request bodies (FastAPI turns a bad one into a 422 naming the field).
ScheduleSpec = Annotated[
    ConstantSchedule | LinearSchedule | PiecewiseSchedule | CosineSchedule,
    Field(discriminator="kind"),
]


def parse_schedule(data: Mapping[str, Any]) -> Schedule:
    """Build a schedule from a dict such as ``{"kind": "linear", "lambda0": 0.1, "alpha": 0.01}``."""
    if not isinstance(data, Mapping):
        raise ScheduleError(f"schedule: expected a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ScheduleError(f"kind: missing or not a string; valid kinds are {schedule_kinds()}")
    cls = get_schedule(kind)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ScheduleError(_describe(kind, exc)) from exc


def _describe(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "schedule"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid {kind} schedule: " + "; ".join(parts)


def _check_step(step: object, field: str) -> int:
    # bool is an int subclass; a True step is a bug, not step 1.
    if isinstance(step, bool) or not isinstance(step, int):
        raise ScheduleError(f"{field}: expected an int, got {type(step).__name__}")
    if step < 0:
        raise ScheduleError(f"{field}: must be >= 0, got {step}")
    return step


class ScheduleTimeline:
    """The schedules in effect over a run: a list of (step_from, schedule), step_from increasing.

    ``at(t)`` evaluates the schedule in effect at global step t at ``t - step_from``: each
    schedule's clock starts when it takes effect, so switching to ``linear(λ0, α)`` mid-run
    starts the ramp at λ0. The first entry is at step 0. Round-trips through ``to_dict`` /
    ``from_dict`` for checkpoints.
    """

    def __init__(self, initial: Schedule) -> None:
        self._changes: list[tuple[int, Schedule]] = [(0, _check_schedule(initial))]

    @property
    def changes(self) -> list[tuple[int, Schedule]]:
        """A copy of the recorded (step_from, schedule) changes, oldest first."""
        return list(self._changes)

    def set(self, step_from: int, schedule: Schedule) -> None:
        """Make ``schedule`` take effect at ``step_from``; a change at the last change's step
        replaces it, an earlier step is refused (the past is not rewritten)."""
        step_from = _check_step(step_from, "step_from")
        schedule = _check_schedule(schedule)
        last = self._changes[-1][0]
        if step_from < last:
            raise ScheduleError(f"step_from: {step_from} is before the last change at step {last}")
        if step_from == last:
            self._changes[-1] = (step_from, schedule)
        else:
            self._changes.append((step_from, schedule))

    def in_effect(self, step: int) -> tuple[int, Schedule]:
        """The (step_from, schedule) in effect at global ``step``."""
        step = _check_step(step, "step")
        starts = [s for s, _ in self._changes]
        return self._changes[bisect.bisect_right(starts, step) - 1]

    def at(self, step: int) -> float:
        """λ at global ``step``."""
        step_from, schedule = self.in_effect(step)
        return schedule.at(step - step_from)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"changes": [{"step_from": 0, "schedule": {...}}, ...]}``."""
        return {"changes": [{"step_from": s, "schedule": sch.model_dump()} for s, sch in self._changes]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleTimeline:
        """Inverse of ``to_dict``; validates every entry and the step order."""
        changes = data.get("changes") if isinstance(data, Mapping) else None
        if not isinstance(changes, list) or not changes:
            raise ScheduleError("changes: expected a non-empty list")
        entries = [_parse_change(i, c) for i, c in enumerate(changes)]
        if entries[0][0] != 0:
            raise ScheduleError(f"changes[0].step_from: must be 0, got {entries[0][0]}")
        timeline = cls(entries[0][1])
        for i, (step_from, schedule) in enumerate(entries[1:], start=1):
            if step_from <= timeline._changes[-1][0]:
                raise ScheduleError(f"changes[{i}].step_from: must increase, got {step_from}")
            timeline.set(step_from, schedule)
        return timeline


def _parse_change(i: int, change: object) -> tuple[int, Schedule]:
    if not isinstance(change, Mapping):
        raise ScheduleError(f"changes[{i}]: expected a mapping")
    step_from = _check_step(change.get("step_from"), f"changes[{i}].step_from")
    try:
        return step_from, parse_schedule(change.get("schedule"))  # type: ignore[arg-type]
    except ScheduleError as exc:
        raise ScheduleError(f"changes[{i}].schedule: {exc}") from exc


def _check_schedule(schedule: object) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise ScheduleError(f"schedule: expected a Schedule, got {type(schedule).__name__}")
    return schedule
