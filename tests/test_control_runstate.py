"""The run-state contract (``contracts/runstate.py``): the transition table and the key layout.

Pure Python, no processes. Run: ``.venv/bin/pytest tests/test_control_runstate.py -q``.
"""

from __future__ import annotations

import itertools

import pytest

from contracts import keys
from contracts import runstate as rs
from contracts.runstate import Command as C
from contracts.runstate import Desired as D
from contracts.runstate import RunStatus as S


@pytest.mark.parametrize(
    ("status", "desired", "command", "expected"),
    [
        (S.QUEUED, D.RUN, C.STOP, (S.STOPPED, D.STOP)),
        (S.QUEUED, D.RUN, C.START, (S.RUNNING, D.RUN)),
        (S.RUNNING, D.RUN, C.STOP, (S.RUNNING, D.STOP)),
        (S.RUNNING, D.STOP, C.RESUME, (S.RUNNING, D.RUN)),
        (S.RUNNING, D.STOP, C.HALT, (S.STOPPED, D.STOP)),
        (S.RUNNING, D.RUN, C.FINISH, (S.SUCCEEDED, D.RUN)),
        (S.RUNNING, D.RUN, C.FAIL, (S.FAILED, D.RUN)),
        (S.STOPPED, D.STOP, C.RESUME, (S.QUEUED, D.RUN)),
        (S.STOPPED, D.STOP, C.STOP, (S.STOPPED, D.STOP)),
        (S.FAILED, D.RUN, C.RESUME, (S.QUEUED, D.RUN)),
    ],
)
def test_allowed_transitions(status: S, desired: D, command: C, expected: tuple[S, D]) -> None:
    assert rs.transition(status, desired, command) == expected


@pytest.mark.parametrize(
    ("status", "command"),
    [(S.SUCCEEDED, c) for c in C] + [(S.FAILED, C.STOP), (S.STOPPED, C.START), (S.QUEUED, C.FINISH)],
)
def test_refused_transitions_name_the_state(status: S, command: C) -> None:
    with pytest.raises(rs.InvalidTransition, match=f"cannot {command.value} a run that is {status.value}"):
        rs.transition(status, D.RUN, command)


def test_a_stop_before_the_learner_starts_wins() -> None:
    with pytest.raises(rs.InvalidTransition):
        rs.transition(S.QUEUED, D.STOP, C.START)


@pytest.mark.parametrize("started", [False, True])
def test_any_stop_resume_sequence_ends_in_the_last_command(started: bool) -> None:
    for sequence in itertools.product([C.STOP, C.RESUME], repeat=6):
        status, desired = (S.RUNNING if started else S.QUEUED), D.RUN
        for command in sequence:
            status, desired = rs.transition(status, desired, command)
        assert desired is (D.STOP if sequence[-1] is C.STOP else D.RUN)
        if not started:
            assert status is (S.STOPPED if sequence[-1] is C.STOP else S.QUEUED)


def test_state_round_trips_through_a_redis_hash() -> None:
    state = rs.RunState(status=S.RUNNING, desired=D.STOP, step=7, created_at=1.5, updated_at=2.5, name="n")
    as_hash = state.to_hash()
    assert all(isinstance(v, str) for v in as_hash.values())
    assert as_hash["status"] == "running" and as_hash["desired"] == "stop"
    assert rs.RunState.from_hash(as_hash) == state


def test_metric_fields_parse_to_finite_numbers_or_none() -> None:
    parsed = rs.parse_metric_fields({"step": "3", "dense_kl": "0.5", "loss": "nan", "x": "inf", "y": "abc"})
    assert parsed == {"step": 3.0, "dense_kl": 0.5, "loss": None, "x": None, "y": None}


def test_keys_share_the_run_prefix_and_refuse_bad_ids() -> None:
    run_id = "run-0123456789ab"
    for key in (rs.run_spec_key(run_id), rs.run_state_key(run_id), rs.run_schedules_key(run_id)):
        assert key.startswith(f"distill:run:{run_id}:")
    assert rs.run_metrics_key(run_id) == keys.metrics_stream(run_id)
    assert rs.idempotency_key("a") != rs.idempotency_key("b")
    assert ":" not in rs.idempotency_key("x:y*").removeprefix("distill:idempotency:")
    with pytest.raises(keys.InvalidRunId):
        rs.run_state_key("run:*")
