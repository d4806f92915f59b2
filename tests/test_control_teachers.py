"""Teacher registration against real teacher processes (tiny random models, built offline).

The control plane calls the teacher's health and ``Info``, stores its tokenizer fingerprint and
refuses runs whose teachers disagree on it (RELIABILITY 18, registration side), or teachers that
are unreachable. Run: ``.venv/bin/pytest tests/test_control_teachers.py -q`` (about 40 s: two
teacher processes load torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from contracts import runstate as rs
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.control_stack import ControlStack, LearnerStateDriver, stack_fixture
from tests.procs import ServiceProcess, free_port, wait_serving
from tests.test_control_api import SPEC, assert_problem

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SERVICE = "distill.v1.TeacherScoring"


@dataclass
class Teacher:
    address: str
    proc: ServiceProcess


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Teacher]]:
    """Two teachers: 'a' with the default tokenizer, 'b' with another vocabulary (other fingerprint)."""
    work = tmp_path_factory.mktemp("teachers")
    started: dict[str, Teacher] = {}
    for name, salt in (("a", ""), ("b", "x")):
        model = build_tiny_model(work / name, TinySpec(vocab_size=64, tokenizer_salt=salt))
        port = free_port()
        proc = ServiceProcess(
            "services.teacher",
            ["--model", str(model), "--port", str(port), "--device", "cpu"],
            work / f"{name}.log",
        )
        started[name] = Teacher(f"127.0.0.1:{port}", proc)
    try:
        for teacher in started.values():
            wait_serving(teacher.proc, teacher.address, SERVICE, timeout=90)
        yield started
    finally:
        for teacher in started.values():
            teacher.proc.stop()


stack = stack_fixture()


def _register(stack: ControlStack, name: str, address: str) -> Any:
    return stack.http.post("/v1/teachers", json={"name": name, "address": address}, headers=stack.auth)


def _spec(*names: str, **extra: Any) -> dict[str, Any]:
    return {**SPEC, "teachers": [{"name": n} for n in names], **extra}


def test_unreachable_teacher_is_422_and_not_stored(stack: ControlStack) -> None:
    body = assert_problem(_register(stack, "gone", f"127.0.0.1:{free_port()}"), 422)
    assert body["errors"][0]["field"] == "address"
    assert "unreachable" in body["detail"]
    assert_problem(stack.http.get("/v1/teachers/gone"), 404)


def test_register_stores_what_info_reports(stack: ControlStack, teachers: dict[str, Teacher]) -> None:
    created = _register(stack, "ta", teachers["a"].address)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/teachers/ta"
    record = stack.http.get("/v1/teachers/ta").json()
    assert record["vocab_size"] == 64 and record["backend"] == "hf"
    assert record["tokenizer_fingerprint"].startswith("sha256:")
    assert _register(stack, "ta", teachers["a"].address).status_code == 200  # re-registered
    assert [t["name"] for t in stack.http.get("/v1/teachers").json()] == ["ta"]


def test_run_teachers_must_share_a_tokenizer(stack: ControlStack, teachers: dict[str, Teacher]) -> None:
    assert _register(stack, "ta", teachers["a"].address).status_code in (200, 201)
    assert _register(stack, "tb", teachers["b"].address).status_code == 201
    fp_a = stack.http.get("/v1/teachers/ta").json()["tokenizer_fingerprint"]
    fp_b = stack.http.get("/v1/teachers/tb").json()["tokenizer_fingerprint"]
    assert fp_a != fp_b
    count = stack.redis.zcard(rs.runs_index_key())
    mixed = assert_problem(stack.http.post("/v1/runs", json=_spec("ta", "tb"), headers=stack.auth), 422)
    assert mixed["errors"][0]["field"] == "teachers[1].name" and fp_b in mixed["detail"]
    student = _spec("ta", student_fingerprint=fp_b)
    wrong = assert_problem(stack.http.post("/v1/runs", json=student, headers=stack.auth), 422)
    assert wrong["errors"][0]["field"] == "teachers[0].name" and "student_fingerprint" in wrong["detail"]
    assert stack.redis.zcard(rs.runs_index_key()) == count
    ok = stack.http.post("/v1/runs", json=_spec("ta", student_fingerprint=fp_a), headers=stack.auth)
    assert ok.status_code == 201, ok.text
    assert stack.http.get(f"/v1/runs/{ok.json()['id']}").json()["tokenizer_fingerprint"] == fp_a


def test_active_run_pins_its_teacher(stack: ControlStack, teachers: dict[str, Teacher]) -> None:
    assert _register(stack, "pinned", teachers["a"].address).status_code == 201
    run_id = stack.http.post("/v1/runs", json=_spec("pinned"), headers=stack.auth).json()["id"]
    LearnerStateDriver(stack.redis, run_id).command(rs.Command.START)
    # The same name now pointing at a teacher with another tokenizer: refused while the run is active.
    moved = assert_problem(_register(stack, "pinned", teachers["b"].address), 422)
    assert run_id in moved["detail"]
    assert_problem(stack.http.delete("/v1/teachers/pinned", headers=stack.auth), 409)
    assert stack.http.post(f"/v1/runs/{run_id}/stop", headers=stack.auth).status_code == 200
    LearnerStateDriver(stack.redis, run_id).command(rs.Command.HALT)
    assert stack.http.delete("/v1/teachers/pinned", headers=stack.auth).status_code == 204
    assert_problem(stack.http.get("/v1/teachers/pinned"), 404)
    assert_problem(stack.http.delete("/v1/teachers/pinned", headers=stack.auth), 404)
    # The stopped run cannot come back without its teacher, nor with another tokenizer behind it.
    gone = assert_problem(stack.http.post(f"/v1/runs/{run_id}/resume", headers=stack.auth), 409)
    assert gone["errors"][0]["field"] == "teachers[0].name"
    assert _register(stack, "pinned", teachers["b"].address).status_code == 201
    moved = assert_problem(stack.http.post(f"/v1/runs/{run_id}/resume", headers=stack.auth), 409)
    assert "tokenizer fingerprint" in moved["detail"]
    assert _register(stack, "pinned", teachers["a"].address).status_code == 200
    assert stack.http.post(f"/v1/runs/{run_id}/resume", headers=stack.auth).json()["status"] == "queued"


def test_grpc_verifier_reachability_uses_a_live_server(
    stack: ControlStack, teachers: dict[str, Teacher]
) -> None:
    body = {"name": "remote", "kind": "grpc", "address": teachers["a"].address}
    assert stack.http.post("/v1/verifiers", json=body, headers=stack.auth).status_code == 201
