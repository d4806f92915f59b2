"""The REST API against a real uvicorn process and a real redis-server (RELIABILITY 24–26, 28–30).

Run: ``.venv/bin/pytest tests/test_control_api.py -q`` (about 20 s). Teacher registration
against a real teacher is in ``test_control_teachers.py``; schemathesis in
``test_control_schemathesis.py``.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contracts import keys
from contracts import runstate as rs
from services.control.app import create_app
from services.control.routes import MUTATING, route_table
from services.control.settings import ControlSettings
from tests.control_stack import ControlStack, LearnerStateDriver, stack_fixture

pytestmark = pytest.mark.integration
PROBLEM = "application/problem+json"
SPEC: dict[str, Any] = {
    "student": "students/tiny",
    "dataset": "data/train.jsonl",
    "rewards": [{"name": "acc", "verifier": "exact_match", "schedule": {"kind": "constant", "value": 0.5}}],
    "steps": 10,
}


stack = stack_fixture()


def _create(
    stack: ControlStack, spec: dict[str, Any] | None = None, key: str | None = None
) -> httpx.Response:
    headers = {**stack.auth, **({"Idempotency-Key": key} if key else {})}
    return stack.http.post("/v1/runs", json=spec or SPEC, headers=headers)


def _run(stack: ControlStack, spec: dict[str, Any] | None = None) -> str:
    response = _create(stack, spec)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["type"].startswith("urn:distill:problem:")
    return body


# --- auth (RELIABILITY 26) ---------------------------------------------------------------------


def _mutating_routes() -> list[tuple[str, str]]:
    app = create_app(ControlSettings(dev=True))
    found = []
    for route in route_table(app.routes):
        for method in sorted(route.methods & MUTATING):
            found.append((method, re.sub(r"\{[^}]+\}", "x", route.path)))
    return found


def test_route_walk_covers_every_mutating_route() -> None:
    routes = _mutating_routes()
    # The walk is built from app.routes; this guards against it silently finding nothing.
    assert ("POST", "/v1/runs") in routes and ("DELETE", "/v1/teachers/x") in routes
    assert len(routes) >= 7


@pytest.mark.parametrize(("method", "path"), _mutating_routes())
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz"])
def test_every_mutating_route_refuses_missing_or_wrong_token(
    stack: ControlStack, method: str, path: str, authorization: str | None
) -> None:
    before = stack.redis.dbsize()
    headers = {} if authorization is None else {"Authorization": authorization}
    response = stack.http.request(method, path, json=SPEC, headers=headers)
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "token" in body["detail"]
    assert stack.redis.dbsize() == before  # nothing changed


def test_reads_need_no_token(stack: ControlStack) -> None:
    assert stack.http.get("/v1/runs").status_code == 200
    assert stack.http.get("/v1/teachers").status_code == 200


# --- idempotency (RELIABILITY 24) --------------------------------------------------------------


def test_same_idempotency_key_gives_one_run(stack: ControlStack) -> None:
    first = _create(stack, key="same-key-1")
    assert first.status_code == 201
    run_id = first.json()["id"]
    assert re.fullmatch(r"run-[0-9a-f]{12}", run_id)
    assert first.headers["location"] == f"/v1/runs/{run_id}"
    count = stack.redis.zcard(rs.runs_index_key())
    # Same spec, keys in another order: the same run.
    again = _create(stack, dict(reversed(list(SPEC.items()))), key="same-key-1")
    assert again.status_code == 200
    assert again.json()["id"] == run_id and again.headers["location"] == f"/v1/runs/{run_id}"
    assert stack.redis.zcard(rs.runs_index_key()) == count


def test_same_idempotency_key_with_other_body_is_409(stack: ControlStack) -> None:
    assert _create(stack, key="same-key-2").status_code == 201
    count = stack.redis.zcard(rs.runs_index_key())
    other = {**SPEC, "steps": 11}
    body = assert_problem(_create(stack, other, key="same-key-2"), 409)
    assert "Idempotency-Key" in body["detail"]
    assert stack.redis.zcard(rs.runs_index_key()) == count


def test_concurrent_retries_with_one_key_create_one_run(stack: ControlStack) -> None:
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _create(stack, key="burst"), range(8)))
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]


def test_without_key_every_post_is_a_new_run(stack: ControlStack) -> None:
    assert _run(stack) != _run(stack)


# --- problem bodies and validation (RELIABILITY 25) ---------------------------------------------


def test_every_error_is_a_problem(stack: ControlStack) -> None:
    assert_problem(stack.http.get("/no/such/path"), 404)
    assert_problem(stack.http.get("/v1/runs/run-000000000000"), 404)
    assert_problem(stack.http.get("/v1/runs/bad:id*"), 404)
    assert_problem(stack.http.get("/v1/teachers/nobody"), 404)
    not_allowed = assert_problem(stack.http.delete("/v1/runs"), 405)
    assert not_allowed["instance"] == "/v1/runs"
    assert set(stack.http.delete("/v1/runs").headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
    assert_problem(stack.http.get("/v1/runs", params={"limit": 0}), 422)
    assert_problem(stack.http.post("/v1/runs", content=b"{not json", headers=stack.auth), 422)
    assert_problem(stack.http.post("/v1/runs/run-000000000000/stop", headers=stack.auth), 404)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"teachers": [{"weight": 1.0}]}, "teachers[0].name"),
        ({"teachers": [{"name": "t", "weight": -1}]}, "teachers[0].weight"),
        ({"objective": {"gamma": 1.5}}, "objective.gamma"),
        ({"sampling": {"temperature": 0}}, "sampling.temperature"),
        ({"steps": "many"}, "steps"),
        ({"rewards": []}, "teachers, rewards"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(
    stack: ControlStack, change: dict[str, Any], field: str
) -> None:
    count = stack.redis.zcard(rs.runs_index_key())
    body = assert_problem(_create(stack, {**SPEC, **change}), 422)
    assert field in [e["field"] for e in body["errors"]], body
    assert field in body["detail"]
    assert stack.redis.zcard(rs.runs_index_key()) == count


def test_unregistered_teacher_is_422_naming_it(stack: ControlStack) -> None:
    body = assert_problem(_create(stack, {**SPEC, "teachers": [{"name": "ghost"}]}), 422)
    assert body["errors"] == [{"field": "teachers[0].name", "message": body["detail"]}]
    assert "ghost" in body["detail"] and "not registered" in body["detail"]


# --- reading runs ------------------------------------------------------------------------------


def test_get_run_shows_spec_state_lambda_and_latest_metrics(stack: ControlStack) -> None:
    run_id = _run(stack, {**SPEC, "name": "shown"})
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    lambdas = learner.begin_step(1)
    assert lambdas == {"acc": 0.5}
    learner.write_metrics(1, kl=0.25, rewards={"acc": 0.75}, lambdas=lambdas)
    run = stack.http.get(f"/v1/runs/{run_id}").json()
    assert run["status"] == "running" and run["step"] == 1 and run["name"] == "shown"
    assert run["spec"]["student"] == SPEC["student"] and run["spec"]["steps"] == 10
    assert run["lambdas"] == {"acc": 0.5}
    latest = run["latest_metrics"]
    assert latest["step"] == 1 and latest["values"]["dense_kl"] == 0.25
    assert latest["values"]["reward/acc"] == 0.75


def test_metrics_series_pages_with_since_and_limit(stack: ControlStack) -> None:
    run_id = _run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    for step in range(1, 6):
        learner.write_metrics(step, kl=1.0 / step, rewards={"acc": step / 10}, lambdas={"acc": 0.5})
    stack.redis.xadd(rs.run_metrics_key(run_id), {"step": "6", "dense_kl": "nan"})
    steps, since = [], None
    while True:
        params = {"limit": 2, **({"since": since} if since else {})}
        page = stack.http.get(f"/v1/runs/{run_id}/metrics", params=params).json()
        steps += [p["step"] for p in page["points"]]
        since = page["next"]
        if since is None:
            break
    assert steps == [1, 2, 3, 4, 5, 6]
    last = stack.http.get(f"/v1/runs/{run_id}/metrics", params={"limit": 1000}).json()["points"][-1]
    assert last["values"]["dense_kl"] is None  # NaN is not JSON: reported as null
    assert_problem(stack.http.get(f"/v1/runs/{run_id}/metrics", params={"since": "abc"}), 422)


def test_list_runs_filters_by_status_and_pages(stack: ControlStack) -> None:
    made = [_run(stack) for _ in range(5)]
    LearnerStateDriver(stack.redis, made[1]).command(rs.Command.START)
    LearnerStateDriver(stack.redis, made[3]).command(rs.Command.START)
    seen, cursor = [], None
    while True:
        params: dict[str, str | int] = {"status": "running", "limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = stack.http.get("/v1/runs", params=params).json()
        assert len(page["runs"]) <= 1
        seen += [r["id"] for r in page["runs"] if r["id"] in made]
        assert all(r["status"] == "running" for r in page["runs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [made[1], made[3]]
    assert_problem(stack.http.get("/v1/runs", params={"status": "sleeping"}), 422)


# --- stop / resume (RELIABILITY 28) -------------------------------------------------------------


def _command(stack: ControlStack, run_id: str, command: str) -> httpx.Response:
    return stack.http.post(f"/v1/runs/{run_id}/{command}", headers=stack.auth)


@pytest.mark.parametrize("started", [False, True])
def test_stop_resume_ten_times_ends_in_the_last_command(stack: ControlStack, started: bool) -> None:
    run_id = _run(stack)
    if started:
        LearnerStateDriver(stack.redis, run_id).command(rs.Command.START)
    commands = ["stop", "resume"] * 5
    for last in ("stop", "resume"):
        for command in [*commands, last]:
            assert _command(stack, run_id, command).status_code == 200
        state = stack.http.get(f"/v1/runs/{run_id}").json()
        assert state["desired"] == ("stop" if last == "stop" else "run")
        if started:  # a running run stops at its next step boundary, written by the learner
            assert state["status"] == "running"
        else:
            assert state["status"] == ("stopped" if last == "stop" else "queued")


def test_concurrent_commands_are_serialized(stack: ControlStack) -> None:
    run_id = _run(stack)
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda c: _command(stack, run_id, c), ["stop", "resume"] * 10))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert _command(stack, run_id, "stop").json()["status"] == "stopped"
    state = rs.RunState.from_hash(stack.redis.hgetall(rs.run_state_key(run_id)))  # type: ignore[arg-type]
    assert (state.status, state.desired) == (rs.RunStatus.STOPPED, rs.Desired.STOP)


def test_learner_honours_stop_and_finished_runs_refuse_commands(stack: ControlStack) -> None:
    run_id = _run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    created = stack.http.get(f"/v1/runs/{run_id}").json()
    assert created["started_at"] == 0.0
    learner.command(rs.Command.START)
    started = stack.http.get(f"/v1/runs/{run_id}").json()["started_at"]
    assert started >= created["created_at"]
    assert _command(stack, run_id, "stop").json()["desired"] == "stop"
    learner.command(rs.Command.HALT)
    assert stack.http.get(f"/v1/runs/{run_id}").json()["status"] == "stopped"
    assert _command(stack, run_id, "resume").json()["status"] == "queued"
    learner.command(rs.Command.START)
    learner.command(rs.Command.FINISH)
    finished = stack.http.get(f"/v1/runs/{run_id}").json()
    assert finished["started_at"] == started  # the first start; a resume does not move it
    assert finished["updated_at"] >= started
    body = assert_problem(_command(stack, run_id, "resume"), 409)
    assert "succeeded" in body["detail"]
    assert_problem(_command(stack, run_id, "stop"), 409)


# --- λ schedule changes (RELIABILITY 29) --------------------------------------------------------


def _put_schedule(stack: ControlStack, run_id: str, schedules: Any) -> httpx.Response:
    return stack.http.put(f"/v1/runs/{run_id}/schedule", json={"schedules": schedules}, headers=stack.auth)


def test_schedule_change_takes_effect_at_the_next_step_and_is_recorded(stack: ControlStack) -> None:
    run_id = _run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    for step in (1, 2, 3):
        assert learner.begin_step(step) == {"acc": 0.5}
    change = _put_schedule(stack, run_id, {"acc": {"kind": "linear", "lambda0": 2.0, "alpha": 0.5}})
    assert change.status_code == 200, change.text
    assert change.json()["step_from"] == 4
    assert learner.begin_step(4) == {"acc": 2.0}  # the ramp's clock starts at its first step
    assert learner.begin_step(5) == {"acc": 3.0}
    run = stack.http.get(f"/v1/runs/{run_id}").json()
    changes = run["schedules"]["acc"]["changes"]
    assert [c["step_from"] for c in changes] == [0, 4]
    assert changes[1]["schedule"] == {"kind": "linear", "lambda0": 2.0, "alpha": 0.5}
    assert run["lambdas"] == {"acc": 3.0}


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ('{"kind": "constant", "value": 1e400}', "schedules.acc.constant.value"),  # inf
        ('{"kind": "constant", "value": Infinity}', "schedules.acc.constant.value"),
        ('{"kind": "constant", "value": NaN}', "schedules.acc.constant.value"),
        ('{"kind": "constant", "value": -0.1}', "schedules.acc.constant.value"),
        ('{"kind": "constant", "value": 1e7}', "schedules.acc.constant.value"),
        ('{"kind": "linear", "lambda0": 1.0}', "schedules.acc.linear.alpha"),
        ('{"kind": "linear", "lambda0": 1.0, "alpha": -Infinity}', "schedules.acc.linear.alpha"),
        ('{"kind": "cosine", "start": 1, "end": 0, "steps": 0}', "schedules.acc.cosine.steps"),
        ('{"kind": "piecewise", "boundaries": [5, 3], "values": [1, 2, 3]}', "schedules.acc.piecewise"),
        ('{"kind": "nope"}', "schedules.acc"),
    ],
)
def test_bad_schedule_is_422_and_changes_nothing(stack: ControlStack, schedule: str, field: str) -> None:
    run_id = _run(stack)
    before = stack.redis.hgetall(rs.run_schedules_key(run_id))
    raw = '{"schedules": {"acc": ' + schedule + "}}"
    headers = {**stack.auth, "Content-Type": "application/json"}
    body = assert_problem(stack.http.put(f"/v1/runs/{run_id}/schedule", content=raw, headers=headers), 422)
    assert field in [e["field"] for e in body["errors"]], body
    assert stack.redis.hgetall(rs.run_schedules_key(run_id)) == before


def test_schedule_for_unknown_reward_or_finished_run_is_refused(stack: ControlStack) -> None:
    run_id = _run(stack)
    body = assert_problem(_put_schedule(stack, run_id, {"speed": {"kind": "constant", "value": 1}}), 422)
    assert body["errors"][0]["field"] == "schedules.speed"
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    learner.command(rs.Command.FINISH)
    assert_problem(_put_schedule(stack, run_id, {"acc": {"kind": "constant", "value": 1}}), 409)


# --- verifiers -------------------------------------------------------------------------------------


def test_verifiers_are_checked_then_listed(stack: ControlStack) -> None:
    post = lambda body: stack.http.post("/v1/verifiers", json=body, headers=stack.auth)  # noqa: E731
    assert post({"name": "exact_match", "kind": "builtin"}).status_code == 201
    # The control plane itself is a reachable HTTP server.
    assert post({"name": "web", "kind": "http", "url": stack.url + "/healthz"}).status_code == 201
    closed = f"127.0.0.1:{stack.port + 0}"
    gone = assert_problem(post({"name": "far", "kind": "http", "url": "http://127.0.0.1:9/x"}), 422)
    assert gone["errors"][0]["field"] == "url"
    assert_problem(post({"name": "g", "kind": "grpc"}), 422)
    assert_problem(post({"name": "g", "kind": "grpc", "address": "127.0.0.1:9"}), 422)
    assert_problem(post({"name": "g", "kind": "http", "address": closed}), 422)
    port_zero = assert_problem(post({"name": "g", "kind": "grpc", "address": "127.0.0.1:0"}), 422)
    assert port_zero["errors"][0]["field"] == "address"
    names = [v["name"] for v in stack.http.get("/v1/verifiers").json()]
    assert names == ["exact_match", "web"]


# --- Prometheus (RELIABILITY 30) ----------------------------------------------------------------


def test_metrics_endpoint_reads_queue_state_with_bounded_labels(stack: ControlStack) -> None:
    run_id = _run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    learner.write_metrics(1, kl=0.5, rewards={"acc": 1.0}, lambdas={"acc": 0.5})
    stream = keys.rollout_stream(run_id)
    for i in range(5):
        stack.redis.xadd(stream, {"record": f"r{i}"})
    stack.redis.xgroup_create(stream, keys.learner_group(run_id), id="0")
    stack.redis.xreadgroup(keys.learner_group(run_id), "learner-0", {stream: ">"}, count=2)
    stack.redis.xadd(keys.dead_letter_stream(run_id), {"reason": "nan"})
    text = stack.http.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    label = (("run_id", run_id),)
    assert samples[("distill_pending", label)] == 2
    assert samples[("distill_queue_lag", label)] == 3
    assert samples[("distill_queue_length", label)] == 5
    assert samples[("distill_dead_letters", label)] == 1
    assert samples[("distill_policy_staleness", label)] == 1
    assert samples[("distill_teacher_latency_seconds", label)] == pytest.approx(0.02)
    assert samples[("distill_reward_timeouts", label)] == 0
    assert samples[("distill_runs", (("status", "running"),))] >= 1
    label_names = {name for (_, labels) in samples for name, _ in labels}
    assert label_names == {"run_id", "status"}  # never per rollout
    finished = _run(stack)
    LearnerStateDriver(stack.redis, finished).command(rs.Command.STOP)
    assert finished not in stack.http.get("/metrics").text  # only active runs carry a label


def test_metrics_run_labels_are_capped(tmp_path: Path) -> None:
    capped = ControlStack(tmp_path, {"DISTILL_METRICS_MAX_RUNS": "2"})
    try:
        made = [_run(capped) for _ in range(4)]
        text = capped.http.get("/metrics").text
        labelled = set(re.findall(r'run_id="([^"]+)"', text))
        assert labelled == set(made[-2:])
    finally:
        capped.close()


def test_corrupt_state_is_a_500_problem_and_logged(stack: ControlStack) -> None:
    run_id = _run(stack)
    stack.redis.hset(rs.run_state_key(run_id), "status", "zombie")  # not a status the contract knows
    body = assert_problem(stack.http.get(f"/v1/runs/{run_id}"), 500)
    assert "zombie" not in body["detail"]  # internals stay in the log, not in the answer
    assert stack.http.get("/healthz").status_code == 200
    assert "unhandled error in GET /v1/runs/" in stack.proc.log()
    assert stack.http.get("/metrics").status_code == 200  # one corrupt run does not break the scrape
    stack.redis.hset(rs.run_state_key(run_id), "status", "queued")
