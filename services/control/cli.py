"""The ``distill`` command line over the REST API (typer).

    distill run SPEC.yaml              submit a run and follow it with a progress bar
    distill runs [--status S]          list runs
    distill status ID | stop ID | resume ID
    distill schedule ID REWARD=SPEC    change λ from the next step (SPEC: a number or schedule JSON)
    distill teachers add NAME ADDRESS  | teachers list | teachers remove NAME
    distill verifiers add NAME --kind K [--address A | --url U] | verifiers list
    distill plot ID [--out FILE]       PNG of KL, rewards and λ over steps
    distill up [--teacher NAME=PATH]   the whole platform as local child processes, until Ctrl-C
    distill demo                       train a teacher on addition, distill a student, with plots

``--api`` / ``DISTILL_API_URL`` and ``--token`` / ``DISTILL_TOKEN`` pick the server. Errors print
the server's problem detail and exit 1. ``distill run`` exits 0 when the run succeeds, 1 when it
fails and 2 when it is stopped.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from tqdm import tqdm

from services.control.client import ApiClient, ApiError, ApiUnreachable
from services.control.demo import DemoConfig, run_demo
from services.control.plot import NothingToPlot, plot_run
from services.control.stack import LocalStack, StackConfig, StackError

app = typer.Typer(help="On-policy distillation platform: talk to the control plane.", no_args_is_help=True)
teachers_app = typer.Typer(help="Teachers registry.", no_args_is_help=True)
verifiers_app = typer.Typer(help="Verifiers registry.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")
app.add_typer(verifiers_app, name="verifiers")
EXIT_CODES = {"succeeded": 0, "failed": 1, "stopped": 2}
TERMINAL = frozenset(EXIT_CODES)


class _State:
    api: str | None = None
    token: str | None = None


@app.callback()
def _options(
    api: Annotated[str | None, typer.Option(envvar="DISTILL_API_URL", help="control plane URL")] = None,
    token: Annotated[str | None, typer.Option(envvar="DISTILL_TOKEN", help="API bearer token")] = None,
) -> None:
    _State.api, _State.token = api, token


def _client() -> ApiClient:
    return ApiClient(_State.api, _State.token)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


@app.command()
def run(
    spec_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="run spec (YAML or JSON)")],
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with it returns the same run")
    ] = None,
    follow: Annotated[bool, typer.Option(help="follow the run until it ends")] = True,
    poll: Annotated[float, typer.Option(min=0.05, help="seconds between status polls")] = 1.0,
) -> None:
    """Submit a run, then show step, KL, reward and λ until it ends."""
    spec = _load_spec(spec_file)
    with _client() as client:
        try:
            created = client.create_run(spec, idempotency_key)
        except (ApiError, ApiUnreachable) as exc:
            raise _fail(exc) from exc
        typer.echo(f"run {created['id']} {created['status']}")
        if not follow:
            return
        try:
            final = _follow(client, created["id"], poll)
        except (ApiError, ApiUnreachable) as exc:
            raise _fail(exc) from exc
        except KeyboardInterrupt:
            # Ctrl-C stops following, not the run: it lives in the platform, not in this process.
            typer.echo(f"stopped following; the run goes on (distill status / distill stop {created['id']})")
            raise typer.Exit(130) from None
    typer.echo(f"run {final['id']} {final['status']} at step {final['step']}")
    raise typer.Exit(EXIT_CODES[final["status"]])


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise _fail(ValueError(f"{path}: not valid YAML: {exc}")) from exc
    if not isinstance(spec, dict):
        raise _fail(ValueError(f"{path}: expected a mapping of run spec fields"))
    return spec


def _follow(client: ApiClient, run_id: str, poll: float) -> dict[str, Any]:
    with tqdm(desc=run_id, unit="step", dynamic_ncols=True) as bar:
        while True:
            current = client.get_run(run_id)
            bar.total = current["spec"]["steps"]
            bar.n = current["step"]
            bar.set_postfix(_postfix(current), refresh=True)
            if current["status"] in TERMINAL:
                return current
            time.sleep(poll)


def _postfix(run_state: dict[str, Any]) -> dict[str, str]:
    values = (run_state.get("latest_metrics") or {}).get("values", {})
    shown = {"status": run_state["status"]}
    if values.get("dense_kl") is not None:
        shown["KL"] = f"{values['dense_kl']:.4g}"
    for key, value in sorted(values.items()):
        if key.startswith("reward/") and value is not None:
            shown[key.removeprefix("reward/")] = f"{value:.3g}"
    for name, value in sorted(run_state.get("lambdas", {}).items()):
        shown[f"λ_{name}"] = f"{value:.3g}"
    return shown


@app.command()
def runs(
    status: Annotated[str | None, typer.Option(help="queued|running|succeeded|failed|stopped")] = None,
) -> None:
    """List runs, oldest first."""
    with _client() as client:
        try:
            found = client.list_runs(status)
        except (ApiError, ApiUnreachable) as exc:
            raise _fail(exc) from exc
    for item in found:
        typer.echo(f"{item['id']}\t{item['status']}\tstep {item['step']}\t{item['name']}")


@app.command()
def status(run_id: str) -> None:
    """Spec, status, step, λ and the latest metrics of a run."""
    _do("GET", f"/v1/runs/{run_id}")


@app.command()
def stop(run_id: str) -> None:
    """Stop a run (a running one stops at its next step boundary)."""
    _do("POST", f"/v1/runs/{run_id}/stop")


@app.command()
def resume(run_id: str) -> None:
    """Resume a stopped or failed run from its last checkpoint."""
    _do("POST", f"/v1/runs/{run_id}/resume")


@app.command()
def schedule(
    run_id: str,
    changes: Annotated[list[str], typer.Argument(help="REWARD=0.5 (constant) or REWARD='{\"kind\": ...}'")],
) -> None:
    """Change λ schedules of named rewards, effective from the run's next step."""
    schedules = {}
    for change in changes:
        name, sep, value = change.partition("=")
        if not sep or not name:
            raise _fail(ValueError(f"{change!r}: expected REWARD=VALUE or REWARD=JSON"))
        schedules[name] = _parse_schedule(name, value)
    _do("PUT", f"/v1/runs/{run_id}/schedule", json={"schedules": schedules})


def _parse_schedule(name: str, value: str) -> Any:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise _fail(ValueError(f"{name}: {value!r} is neither a number nor JSON")) from exc
    # A bare number is a constant λ; the server validates (finite, in range) and names the field.
    return {"kind": "constant", "value": parsed} if isinstance(parsed, int | float) else parsed


@teachers_app.command("add")
def teachers_add(
    name: str,
    address: Annotated[str, typer.Argument(help="the teacher's gRPC host:port")],
    weight: Annotated[float, typer.Option(help="default α")] = 1.0,
) -> None:
    """Register a teacher (the server calls its Info and health first)."""
    _do("POST", "/v1/teachers", json={"name": name, "address": address, "weight": weight})


@teachers_app.command("list")
def teachers_list() -> None:
    _do("GET", "/v1/teachers")


@teachers_app.command("remove")
def teachers_remove(name: str) -> None:
    """Forget a teacher (refused while an active run uses it)."""
    _do("DELETE", f"/v1/teachers/{name}")
    typer.echo(f"teacher {name} removed")


@verifiers_app.command("add")
def verifiers_add(
    name: str,
    kind: Annotated[str, typer.Option(help="builtin|grpc|http")] = "builtin",
    address: Annotated[str | None, typer.Option(help="grpc verifier host:port")] = None,
    url: Annotated[str | None, typer.Option(help="http verifier URL")] = None,
    option: Annotated[list[str] | None, typer.Option(help="KEY=JSON_VALUE, repeatable")] = None,
) -> None:
    """Register a verifier."""
    options = {}
    for item in option or []:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    body = {"name": name, "kind": kind, "address": address, "url": url, "options": options}
    _do("POST", "/v1/verifiers", json={k: v for k, v in body.items() if v is not None})


@verifiers_app.command("list")
def verifiers_list() -> None:
    _do("GET", "/v1/verifiers")


@app.command()
def plot(
    run_id: str,
    out: Annotated[Path | None, typer.Option(help="PNG path (default: RUN_ID.png)")] = None,
) -> None:
    """Write a PNG of the dense KL, the rewards and λ over steps."""
    with _client() as client:
        try:
            points = client.metrics(run_id)
        except (ApiError, ApiUnreachable) as exc:
            raise _fail(exc) from exc
    try:
        path = plot_run(run_id, points, out or Path(f"{run_id}.png"))
    except NothingToPlot as exc:
        raise _fail(exc) from exc
    typer.echo(str(path))


def _do(method: str, path: str, **kwargs: Any) -> None:
    with _client() as client:
        try:
            result = client.request(method, path, **kwargs)
        except (ApiError, ApiUnreachable) as exc:
            raise _fail(exc) from exc
    if result is not None:
        _show(result)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    teacher: Annotated[list[str], typer.Option(help="NAME=MODEL_PATH, one teacher service each")] = [],  # noqa: B006
    work_dir: Annotated[Path, typer.Option(help="runs, logs and Redis data")] = Path("runs/stack"),
    port: Annotated[int, typer.Option(help="control plane port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="rollout worker processes")] = 1,
) -> None:
    """Start Redis, teachers, reward service, control plane, learner and workers; Ctrl-C stops them."""
    teachers = {}
    for item in teacher:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).exists():
            raise _fail(ValueError(f"--teacher: expected NAME=EXISTING_PATH, got {item!r}"))
        teachers[name] = Path(path)
    # Ctrl-C and `kill` both stop the children: SIGTERM would otherwise end this process alone, and
    # a shell starts background jobs with SIGINT ignored
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    stack = LocalStack(StackConfig(work_dir, teachers, port, workers))
    try:
        stack.start()
        typer.echo(f"control plane: {stack.api_url}  (export DISTILL_API_URL={stack.api_url})")
        typer.echo(f"API token:     export DISTILL_TOKEN={stack.cfg.token}")
        for name, address in stack.teacher_addresses.items():
            typer.echo(f"teacher {name}: {address}  (register: distill teachers add {name} {address})")
        typer.echo(f"logs:          {work_dir / 'logs'}; Ctrl-C stops everything")
        while True:
            stack.check_alive()
            time.sleep(1.0)
    except StackError as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        typer.echo("stopping ...")
    finally:
        stack.stop()


@app.command()
def demo(
    work_dir: Annotated[Path, typer.Option(help="models, runs, logs and the plot")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = DemoConfig.steps,
    port: Annotated[int, typer.Option(help="control plane port")] = 8000,
    teacher_steps: Annotated[int, typer.Option(min=1, help="teacher training steps cap (first run)")] = (
        DemoConfig.teacher_steps
    ),
    student_warmup_steps: Annotated[int, typer.Option(min=1, help="student warm-up (first run)")] = (
        DemoConfig.student_warmup_steps
    ),
    eval_count: Annotated[int, typer.Option(min=1, help="held-out problems per length")] = (
        DemoConfig.eval_count
    ),
) -> None:
    """Train a teacher on addition (cached), then distill a student through the local stack, with plots."""
    cfg = DemoConfig(work_dir, steps, port, teacher_steps=teacher_steps,
                     student_warmup_steps=student_warmup_steps, eval_count=eval_count)  # fmt: skip
    try:
        code = run_demo(cfg, lambda client, run_id: _follow(client, run_id, 0.5))
    except (StackError, ApiError, ApiUnreachable) as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)


def main() -> None:
    """Entry point of the ``distill`` script."""
    app()
