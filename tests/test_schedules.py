"""λ schedules (contracts/schedules.py): values, validation, registry, timeline, purity."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
from pydantic import TypeAdapter, ValidationError

from contracts.schedules import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    PiecewiseSchedule,
    ScheduleError,
    ScheduleSpec,
    ScheduleTimeline,
    get_schedule,
    parse_schedule,
    register_schedule,
    schedule_kinds,
)


def test_constant() -> None:
    s = ConstantSchedule(value=0.25)
    assert [s.at(t) for t in (0, 1, 10_000)] == [0.25, 0.25, 0.25]


def test_linear_is_section_5_1_formula() -> None:
    s = LinearSchedule(lambda0=0.5, alpha=0.01)
    for t in (0, 1, 7, 300):
        assert s.at(t) == pytest.approx(0.5 * (1 + 0.01 * t))


def test_linear_with_negative_alpha_is_clamped_at_zero() -> None:
    s = LinearSchedule(lambda0=1.0, alpha=-0.1)
    assert s.at(5) == pytest.approx(0.5)
    assert s.at(10) == 0.0
    assert s.at(1000) == 0.0


def test_piecewise() -> None:
    s = PiecewiseSchedule(boundaries=[10, 20], values=[0.0, 0.5, 1.0])
    got = [s.at(t) for t in (0, 9, 10, 19, 20, 500)]
    assert got == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


def test_cosine_endpoints_midpoint_and_hold() -> None:
    s = CosineSchedule(start=1.0, end=0.2, steps=100)
    assert s.at(0) == pytest.approx(1.0)
    assert s.at(50) == pytest.approx(0.6)
    assert s.at(100) == pytest.approx(0.2)
    assert s.at(10_000) == pytest.approx(0.2)
    values = [s.at(t) for t in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"kind": "constant", "value": -0.1}, "value"),
        ({"kind": "constant", "value": math.inf}, "value"),
        ({"kind": "constant", "value": math.nan}, "value"),
        ({"kind": "constant", "value": 0.1, "valeu": 1}, "valeu"),
        ({"kind": "linear", "lambda0": -1.0, "alpha": 0.0}, "lambda0"),
        ({"kind": "linear", "lambda0": 1.0, "alpha": math.nan}, "alpha"),
        ({"kind": "linear", "lambda0": 1.0}, "alpha"),
        ({"kind": "piecewise", "boundaries": [5, 5], "values": [0, 1, 2]}, "boundaries"),
        ({"kind": "piecewise", "boundaries": [5], "values": [0.0]}, "values"),
        ({"kind": "piecewise", "boundaries": [0], "values": [0.0, 1.0]}, "boundaries"),
        ({"kind": "piecewise", "boundaries": [5], "values": [0.0, -1.0]}, "values"),
        ({"kind": "cosine", "start": 1.0, "end": -1.0, "steps": 10}, "end"),
        ({"kind": "cosine", "start": 1.0, "end": 0.0, "steps": 0}, "steps"),
        ({"kind": "constant", "value": 1e300}, "value"),
    ],
)
def test_bad_specs_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ScheduleError, match=field):
        parse_schedule(spec)
    # The same spec through the discriminated union (what a REST body goes through).
    with pytest.raises(ValidationError) as info:
        TypeAdapter(ScheduleSpec).validate_python(spec)
    assert field in str(info.value)


def test_unknown_kind_lists_valid_ones() -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule({"kind": "exponential", "rate": 1.0})
    for kind in ("constant", "cosine", "linear", "piecewise"):
        assert kind in str(info.value)
    with pytest.raises(ScheduleError, match="kind"):
        parse_schedule({"value": 1.0})
    with pytest.raises(ScheduleError, match="valid kinds"):
        get_schedule("nope")


def test_registry_refuses_duplicate_and_lists_kinds() -> None:
    assert schedule_kinds() == ["constant", "cosine", "linear", "piecewise"]
    assert get_schedule("linear") is LinearSchedule
    with pytest.raises(ScheduleError, match="already registered"):
        register_schedule("linear")(LinearSchedule)


def test_union_parses_each_kind() -> None:
    adapter = TypeAdapter(ScheduleSpec)
    s = adapter.validate_python({"kind": "cosine", "start": 0.0, "end": 1.0, "steps": 4})
    assert isinstance(s, CosineSchedule)
    assert parse_schedule(s.model_dump()) == s


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_bad_step_rejected(step: object) -> None:
    with pytest.raises(ScheduleError, match="step"):
        ConstantSchedule(value=1.0).at(step)  # type: ignore[arg-type]


def test_timeline_change_mid_run_takes_effect_at_its_step() -> None:
    tl = ScheduleTimeline(ConstantSchedule(value=0.1))
    tl.set(100, LinearSchedule(lambda0=0.5, alpha=0.1))
    assert tl.at(99) == pytest.approx(0.1)
    # The new schedule's clock starts at its own step_from.
    assert tl.at(100) == pytest.approx(0.5)
    assert tl.at(110) == pytest.approx(0.5 * (1 + 0.1 * 10))
    assert tl.in_effect(100)[0] == 100
    assert tl.in_effect(50)[0] == 0


def test_timeline_refuses_rewriting_the_past_and_changes_nothing() -> None:
    tl = ScheduleTimeline(ConstantSchedule(value=0.1))
    tl.set(10, ConstantSchedule(value=0.2))
    before = tl.to_dict()
    with pytest.raises(ScheduleError, match="step_from"):
        tl.set(5, ConstantSchedule(value=0.3))
    with pytest.raises(ScheduleError, match="step_from"):
        tl.set(-1, ConstantSchedule(value=0.3))
    with pytest.raises(ScheduleError, match="schedule"):
        tl.set(20, {"kind": "constant", "value": 1.0})  # type: ignore[arg-type]
    assert tl.to_dict() == before
    # A second change at the same boundary replaces the first.
    tl.set(10, ConstantSchedule(value=0.4))
    assert len(tl.changes) == 2
    assert tl.at(10) == pytest.approx(0.4)


def test_timeline_round_trips_through_json() -> None:
    tl = ScheduleTimeline(CosineSchedule(start=1.0, end=0.0, steps=50))
    tl.set(20, PiecewiseSchedule(boundaries=[5], values=[0.3, 0.6]))
    tl.set(40, LinearSchedule(lambda0=0.2, alpha=-0.5))
    back = ScheduleTimeline.from_dict(json.loads(json.dumps(tl.to_dict())))
    assert back.changes == tl.changes
    for t in (0, 19, 20, 24, 25, 40, 41, 1000):
        assert back.at(t) == tl.at(t)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "changes"),
        ({"changes": []}, "changes"),
        ({"changes": [{"step_from": 3, "schedule": {"kind": "constant", "value": 1}}]}, "must be 0"),
        (
            {
                "changes": [
                    {"step_from": 0, "schedule": {"kind": "constant", "value": 1}},
                    {"step_from": 0, "schedule": {"kind": "constant", "value": 2}},
                ]
            },
            r"changes\[1\].step_from",
        ),
        (
            {"changes": [{"step_from": 0, "schedule": {"kind": "constant", "value": -2}}]},
            r"changes\[0\].schedule: .*value",
        ),
    ],
)
def test_timeline_from_bad_dict(data: dict[str, object], field: str) -> None:
    with pytest.raises(ScheduleError, match=field):
        ScheduleTimeline.from_dict(data)


def test_module_is_pure_python() -> None:
    code = (
        "import sys, contracts.schedules; "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
