"""The ``distill`` CLI against a live control plane (real uvicorn, real redis-server).

No learner trains here: ``LearnerStateDriver`` moves the run state and writes metrics with the
learner's own state code (``learner/run_state.py``); `tests/test_cli_up.py` runs the real one. Commands run
in-process through typer's ``CliRunner``; one runs the installed ``distill`` script.
Run: ``.venv/bin/pytest tests/test_cli.py -q`` (about 15 s).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import yaml
from typer.testing import CliRunner, Result

from contracts import runstate as rs
from services.control.cli import app
from tests.control_stack import TOKEN, ControlStack, LearnerStateDriver, run_ids, stack_fixture
from tests.procs import free_port
from tests.test_control_api import SPEC

pytestmark = pytest.mark.integration


stack = stack_fixture()


def distill(stack: ControlStack, *args: str) -> Result:
    env = {"DISTILL_API_URL": stack.url, "DISTILL_TOKEN": TOKEN}
    return CliRunner().invoke(app, list(args), env=env)


def _new_run(stack: ControlStack) -> str:
    response = stack.http.post("/v1/runs", json=SPEC, headers=stack.auth)
    assert response.status_code == 201
    return str(response.json()["id"])


def test_runs_status_stop_resume(stack: ControlStack) -> None:
    run_id = _new_run(stack)
    listed = distill(stack, "runs")
    assert listed.exit_code == 0 and run_id in listed.stdout
    status = distill(stack, "status", run_id)
    assert status.exit_code == 0 and '"status": "queued"' in status.stdout
    assert '"acc": 0.5' in status.stdout  # λ
    stopped = distill(stack, "stop", run_id)
    assert stopped.exit_code == 0 and '"status": "stopped"' in stopped.stdout
    assert run_id in distill(stack, "runs", "--status", "stopped").stdout
    assert run_id not in distill(stack, "runs", "--status", "queued").stdout
    assert '"status": "queued"' in distill(stack, "resume", run_id).stdout


def test_status_of_unknown_run_prints_the_problem(stack: ControlStack) -> None:
    result = distill(stack, "status", "run-000000000000")
    assert result.exit_code == 1
    assert "404" in result.stderr and "does not exist" in result.stderr


def test_schedule_changes_lambda_from_the_next_step(stack: ControlStack) -> None:
    run_id = _new_run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    learner.begin_step(7)
    result = distill(stack, "schedule", run_id, "acc=0.25")
    assert result.exit_code == 0, result.output
    assert '"step_from": 8' in result.stdout
    assert learner.begin_step(8) == {"acc": 0.25}
    ramp = distill(stack, "schedule", run_id, 'acc={"kind": "linear", "lambda0": 1, "alpha": 1}')
    assert ramp.exit_code == 0 and '"step_from": 9' in ramp.stdout
    bad = distill(stack, "schedule", run_id, "acc=-1")
    assert bad.exit_code == 1 and "schedules.acc.constant.value" in bad.stderr
    assert distill(stack, "schedule", run_id, "acc").exit_code == 1


def test_teachers_add_unreachable_gives_a_clear_error(stack: ControlStack) -> None:
    result = distill(stack, "teachers", "add", "far", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 1
    assert "422" in result.stderr and "unreachable" in result.stderr
    listed = distill(stack, "teachers", "list")
    assert listed.exit_code == 0 and "far" not in listed.stdout
    malformed = distill(stack, "teachers", "add", "far", "no-port")
    assert malformed.exit_code == 1 and "address" in malformed.stderr


def test_verifiers_add_and_list(stack: ControlStack) -> None:
    added = distill(stack, "verifiers", "add", "math_equiv", "--option", "tolerance=0.001")
    assert added.exit_code == 0, added.output
    listed = distill(stack, "verifiers", "list")
    assert '"tolerance": 0.001' in listed.stdout


def test_plot_writes_a_png_of_kl_rewards_and_lambda(stack: ControlStack, tmp_path: Path) -> None:
    run_id = _new_run(stack)
    learner = LearnerStateDriver(stack.redis, run_id)
    empty = distill(stack, "plot", run_id, "--out", str(tmp_path / "none.png"))
    assert empty.exit_code == 1 and "no metrics" in empty.stderr
    for step in range(1, 21):
        lam = 0.5 if step < 10 else 1.0
        learner.write_metrics(step, kl=2.0 / step, rewards={"acc": step / 20}, lambdas={"acc": lam})
    out = tmp_path / "plot.png"
    result = distill(stack, "plot", run_id, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 600
    assert pixels[..., :3].std() > 0.05  # curves and axes, not a blank canvas


def _drive(stack: ControlStack, before: set[str], final: rs.Command, steps: int) -> None:
    """Wait for the CLI's run to appear, then play the learner: start, steps with metrics, end."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = run_ids(stack.redis) - before
        if new:
            break
        time.sleep(0.02)
    (run_id,) = new
    learner = LearnerStateDriver(stack.redis, run_id)
    learner.command(rs.Command.START)
    for step in range(1, steps + 1):
        lambdas = learner.begin_step(step)
        learner.write_metrics(step, kl=1.0 / step, rewards={"acc": 0.1 * step}, lambdas=lambdas)
        time.sleep(0.05)
    if final is rs.Command.FAIL:
        stack.redis.hset(rs.run_state_key(run_id), "error", "learner died")
    learner.command(final)


@pytest.mark.parametrize(
    ("final", "code", "word"),
    [(rs.Command.FINISH, 0, "succeeded"), (rs.Command.FAIL, 1, "failed"), (rs.Command.HALT, 2, "stopped")],
)
def test_run_submits_and_follows_until_the_end(
    stack: ControlStack, tmp_path: Path, final: rs.Command, code: int, word: str
) -> None:
    spec: dict[str, Any] = {**SPEC, "steps": 4}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    before = run_ids(stack.redis)
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            _drive(stack, before, final, steps=4)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    learner = threading.Thread(target=drive)
    learner.start()
    result = distill(stack, "run", str(spec_file), "--poll", "0.05")
    learner.join(30)
    assert not errors, errors
    assert result.exit_code == code, result.output
    assert f"{word} at step 4" in result.stdout
    assert "step" in result.stderr and "KL" in result.stderr  # the progress bar


def test_run_with_a_bad_spec_names_the_field(stack: ControlStack, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "objective": {"gamma": 2}}))
    result = distill(stack, "run", str(spec_file))
    assert result.exit_code == 1 and "objective.gamma" in result.stderr


def test_run_with_a_spec_that_is_not_a_mapping(stack: ControlStack, tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("- just\n- a list\n")
    result = distill(stack, "run", str(spec_file))
    assert result.exit_code == 1 and "expected a mapping" in result.stderr


def test_unreachable_control_plane(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["runs"], env={"DISTILL_API_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.exit_code == 1 and "cannot reach the control plane" in result.stderr


def test_installed_distill_script(stack: ControlStack) -> None:
    script = shutil.which("distill", path=str(Path(sys.executable).parent))
    assert script is not None, "the distill console script is not installed next to this python"
    env = {"DISTILL_API_URL": stack.url, "DISTILL_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([script, "runs"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
