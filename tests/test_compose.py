"""docker-compose.yml and docker/*.Dockerfile, checked without a container engine (RELIABILITY 31-33).

    .venv/bin/pytest tests/test_compose.py -q

- The compose file, interpolated as compose would with a test environment, validates against the
  compose specification's JSON schema. The schema is not copied into this repository: it is read
  from the ``docker-compose==1.29.2`` wheel on PyPI (``compose/config/compose_spec.json``, the
  compose spec as of 2021, with ``profiles`` and device reservations), downloaded once with pip and
  cached under the pytest cache; the wheel's sha256 is pinned. No network means a clear failure.
- Profiles: ``cpu`` reserves no GPU anywhere; ``gpu`` reserves the configured GPUs for the learner.
- Every service has a healthcheck; ``depends_on`` waits for healthy services of the same profile;
  state lives in named volumes (they survive ``down`` without ``-v``); stop grace periods.
- Each service's command is ``python -m MODULE ...`` where MODULE is started as a plain process by
  the other tests (an AST scan of tests/*.py), and the module's own argument parser accepts the
  command line (scripts/check_argv.py). Healthcheck commands are parsed the same way.
- Each Dockerfile copies paths that exist and are not dockerignored, exactly what
  scripts/images.py says the image holds, and runs a module it holds; each image's code imports
  with only that image's packages (the control plane's without torch).
- ``python -m services.rpc.healthcheck`` against a real reward service process.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import importlib.util
import itertools
import json
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from tests.procs import ROOT, ServiceProcess, free_port, wait_serving

COMPOSE_FILE = ROOT / "docker-compose.yml"
SPEC_WHEEL = "docker-compose==1.29.2"
SPEC_WHEEL_SHA256 = "8d5589373b35c8d3b1c8c1182c6e4a4ff14bffa3dd0b605fcd08f73c94cef809"
SPEC_MEMBER = "compose/config/compose_spec.json"
TOKEN = "compose-test-token-0123456789"
# The modules compose runs, one per process of SPEC.md.
PROCESS_MODULES = {"services.control", "services.reward", "services.teacher", "services.rollout", "learner"}
# compose-go casts these interpolated strings to integers before validating (interpolateTypeCastMapping).
INT_PATHS = (("deploy", "replicas"),)
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the body runs
    spec.loader.exec_module(module)
    return module


images = _load_script("images")


# --- compose's variable interpolation (https://docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/)


class InterpolationError(ValueError):
    pass


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


def _substitute(text: str, env: Mapping[str, str], where: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise InterpolationError(f"{where}: invalid interpolation format in {text!r}")
        name, op, arg = m["braced"] or m["named"], m["op"], m["arg"] or ""
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return arg if missing else str(value)
        if op in ("?", ":?") and missing:
            raise InterpolationError(f"{where}: required variable {name} is missing a value: {arg}")
        return value or ""

    return _VAR.sub(one, text)


def interpolate(node: Any, env: Mapping[str, str], where: str = "") -> Any:
    """``node`` with every ``$VAR``/``${VAR...}`` in its string values replaced, as compose does."""
    if isinstance(node, str):
        return _substitute(node, env, where)
    if isinstance(node, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: interpolate(v, env, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    return node


def render(env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model: YAML (anchors and merge keys resolved), interpolated, casts applied."""
    doc = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)
    for service in doc["services"].values():
        for path in INT_PATHS:
            parent = service
            for key in path[:-1]:
                parent = parent.get(key) or {}
            if isinstance(parent.get(path[-1]), str):
                parent[path[-1]] = int(parent[path[-1]])
    return doc


def active(doc: Mapping[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """Services ``docker compose --profile PROFILE up`` starts: no profile, or that one."""
    return {n: s for n, s in doc["services"].items() if not s.get("profiles") or profile in s["profiles"]}


def module_of(service: Mapping[str, Any]) -> str | None:
    command = service.get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command or [])
    return argv[2] if argv[:2] == ["python", "-m"] and len(argv) > 2 else None


def seconds(duration: str) -> float:
    assert _DURATION.match(duration), f"{duration!r} is not a compose duration"
    return sum(
        float(n) * _DURATION_UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)(ns|us|ms|s|m|h)", duration)
    )


def gpu_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    reservations = ((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return list(reservations.get("devices") or [])


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return render({"DISTILL_API_TOKEN": TOKEN})


@pytest.fixture(scope="module")
def compose_schema(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("compose-spec") if cache is not None else tmp_path_factory.mktemp("compose-spec")
    target = folder / "compose_spec.json"
    if not target.exists():
        target.write_bytes(_download_schema(Path(folder)))
    return json.loads(target.read_text())


def _download_schema(folder: Path) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SPEC_WHEEL,
         "-d", str(folder)],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    wheels = sorted(folder.glob("docker_compose-1.29.2-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.fail(
            f"cannot fetch the compose specification schema: `pip download {SPEC_WHEEL}` from PyPI failed "
            f"(this test needs PyPI once; the schema is then cached in {folder}):\n{done.stderr[-2000:]}"
        )
    data = wheels[0].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == SPEC_WHEEL_SHA256, f"{wheels[0].name}: sha256 {digest}, expected {SPEC_WHEEL_SHA256}"
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(SPEC_MEMBER)


# --- the schema and the file's shape


def schema_validator(schema: dict[str, Any]) -> jsonschema.Draft201909Validator:
    # The file names its draft as "http://json-schema.org/draft/2019-09/schema#", a spelling
    # jsonschema does not look up (it warns and falls back to the latest draft): name it here.
    assert "draft/2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_the_schema_knows_profiles_and_device_reservations(compose_schema: dict[str, Any]) -> None:
    defs = compose_schema["definitions"]
    assert "profiles" in defs["service"]["properties"]
    devices = defs["deployment"]["properties"]["resources"]["properties"]["reservations"]["properties"][
        "devices"
    ]
    assert devices == {"$ref": "#/definitions/devices"}
    assert {"driver", "count", "device_ids", "capabilities"} <= set(defs["devices"]["items"]["properties"])


@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "LEARNER_GPU": "1",
            "ROLLOUT_WORKERS": "4",
            "TEACHER_MODEL": "/models/qwen",
            "TEACHER_BACKEND": "vllm",
        },
    ],
    ids=["defaults", "configured"],
)
def test_compose_file_validates_against_the_compose_schema(
    compose_schema: dict[str, Any], env: dict[str, str]
) -> None:
    rendered = render({"DISTILL_API_TOKEN": TOKEN, **env})
    errors = sorted(schema_validator(compose_schema).iter_errors(rendered), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_rejects(compose_schema: dict[str, Any], doc: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(doc))
    broken["services"]["control"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert not schema_validator(compose_schema).is_valid(broken)


def test_no_default_secret_and_no_dev_mode() -> None:
    with pytest.raises(InterpolationError, match="DISTILL_API_TOKEN"):
        render({})
    with pytest.raises(InterpolationError, match="DISTILL_API_TOKEN"):
        render({"DISTILL_API_TOKEN": ""})
    rendered = render({"DISTILL_API_TOKEN": TOKEN})
    assert rendered["services"]["control"]["environment"]["DISTILL_API_TOKEN"] == TOKEN
    for name, service in rendered["services"].items():
        assert "--dev" not in (service.get("command") or []), name


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${EMPTY-d}/${UNSET-d}/$SET/$$HOME", env) == "x/d//d/x/$HOME"
    with pytest.raises(InterpolationError, match="invalid interpolation"):
        interpolate("cost: 5$", env, "x")
    with pytest.raises(InterpolationError, match="UNSET is missing a value: why"):
        interpolate("${UNSET?why}", env, "x")


# --- profiles (RELIABILITY 31)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_each_profile_runs_every_process_once(doc: dict[str, Any], profile: str) -> None:
    services = active(doc, profile)
    modules = [module_of(s) for s in services.values()]
    assert sorted(m for m in modules if m) == sorted(PROCESS_MODULES), modules
    redis_services = [s for s in services.values() if str(s.get("image", "")).startswith("redis:")]
    assert len(redis_services) == 1
    assert redis_services[0]["command"][:1] == ["redis-server"]
    assert {"--appendonly", "yes", "--appendfsync", "everysec"} <= set(redis_services[0]["command"])


def test_cpu_profile_needs_no_gpu(doc: dict[str, Any]) -> None:
    for name, service in active(doc, "cpu").items():
        assert not gpu_devices(service), f"{name} reserves a device under the cpu profile"
        assert "runtime" not in service and "gpus" not in service, name
        assert "cuda" not in " ".join(service.get("command") or []), f"{name} asks for cuda"
        assert "cuda" not in str((service.get("build") or {}).get("args", {})), f"{name} builds for CUDA"


def test_gpu_profile_reserves_the_configured_gpus() -> None:
    rendered = render({"DISTILL_API_TOKEN": TOKEN, "LEARNER_GPU": "3", "TEACHER_GPU": "1"})
    gpu = active(rendered, "gpu")
    by_module = {module_of(s): s for s in gpu.values()}
    learner = by_module["learner"]
    assert gpu_devices(learner) == [{"driver": "nvidia", "device_ids": ["3"], "capabilities": ["gpu"]}]
    assert learner["command"][learner["command"].index("--device") + 1] == "cuda"
    assert gpu_devices(by_module["services.teacher"])[0]["device_ids"] == ["1"]
    for name, service in gpu.items():
        if gpu_devices(service):
            index = service["build"]["args"]["TORCH_INDEX"]
            assert re.search(r"/cu\d+$", index), f"{name}: GPU service built with torch from {index}"


# --- health, ordering, volumes, stop grace (RELIABILITY 32, 33)


def test_every_service_has_a_healthcheck(doc: dict[str, Any]) -> None:
    for name, service in doc["services"].items():
        check = service.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["test"][1:], name
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                seconds(check[key])


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_depends_on_waits_for_healthy_services_of_the_same_profile(doc: dict[str, Any], profile: str) -> None:
    services = active(doc, profile)
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dep, spec in depends.items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}: {spec}"
            assert dep in services, f"{name} depends on {dep}, which the {profile} profile does not start"
    by_module = {module_of(s): s for s in services.values()}
    assert {"redis", "reward"} <= set(by_module["services.control"]["depends_on"])
    assert any(d.startswith("teacher") for d in by_module["services.rollout"]["depends_on"])


def _mounts(service: Mapping[str, Any]) -> Iterator[tuple[str | None, str, str]]:
    """(source, target, type) of each volume entry, short or long syntax."""
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            yield entry.get("source"), entry["target"], entry.get("type", "volume")
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            yield None, parts[0], "volume"  # anonymous volume: gone with the container
        else:
            kind = "bind" if parts[0].startswith((".", "/", "~", "$")) else "volume"
            yield parts[0], parts[1], kind


def test_state_lives_in_named_volumes(doc: dict[str, Any]) -> None:
    declared = doc.get("volumes") or {}
    targets: dict[str, dict[str, str]] = {}
    for name, service in doc["services"].items():
        for source, target, kind in _mounts(service):
            assert kind == "volume" and source, f"{name}: {target} is a {kind} mount, not a named volume"
            assert source in declared, f"{name}: volume {source} is not declared at the top level"
            assert not (declared[source] or {}).get("external"), source
            targets.setdefault(name, {})[target] = source
    for name, service in doc["services"].items():
        module = module_of(service)
        if str(service.get("image", "")).startswith("redis:"):
            assert targets[name].get("/data") == "redis-data"
        if module == "learner":
            assert "--runs-dir" in service["command"], f"{name}: checkpoints would not be in a volume"
            runs_dir = service["command"][service["command"].index("--runs-dir") + 1]
            assert targets[name].get(runs_dir) == "runs"
        if module == "services.rollout":
            # the worker loads the weights the learner publishes by path
            assert targets[name].get("/runs") == "runs"
        if module == "services.teacher":
            assert targets[name].get("/models") == "models"


def test_stop_grace_periods(doc: dict[str, Any]) -> None:
    for name, service in doc["services"].items():
        assert "stop_grace_period" in service, f"{name}: no stop_grace_period"
        grace = seconds(service["stop_grace_period"])
        if module_of(service) == "learner":
            # a training step plus a fsync'd checkpoint of a real model; compose's default is 10 s
            assert grace >= 120, f"{name}: {grace} s"
        elif module_of(service) is not None:
            assert grace > 10, f"{name}: {grace} s leaves no time past the servers' 10 s drain"


# --- commands are the ones the tests run


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def modules_started_by_tests() -> set[str]:
    """Modules the tests start as processes: ``ServiceProcess("mod", ...)`` and ``[..., "-m", "mod"]``."""
    found: set[str] = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue  # this file runs commands only to check them
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _callee(node) == "ServiceProcess":
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
            if isinstance(node, ast.List | ast.Tuple):
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                found.update(str(v) for k, v in itertools.pairwise(values) if k == "-m" and v)
    return found


def _commands(doc: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """(what, argv) of every ``python -m`` command: services' commands and healthchecks."""
    out = []
    for name, service in doc["services"].items():
        if module_of(service):
            out.append((f"{name}.command", list(service["command"])))
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:3] == ["CMD", "python", "-m"]:
            out.append((f"{name}.healthcheck", test[1:]))
    return out


@pytest.fixture(scope="module")
def parsed(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    items = [{"module": argv[2], "args": argv[3:]} for _, argv in _commands(doc)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_argv.py")],
        input=json.dumps(items), capture_output=True, text=True, cwd=ROOT, timeout=110,
    )  # fmt: skip
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(items), done.stderr[-3000:]
    return {what: r for (what, _), r in zip(_commands(doc), results, strict=True)}


def test_every_service_runs_a_module_the_tests_run_as_a_process(doc: dict[str, Any]) -> None:
    tested = modules_started_by_tests()
    for name, service in doc["services"].items():
        if str(service.get("image", "")).startswith("redis:"):
            continue
        module = module_of(service)
        assert module is not None, f"{name}: command is not `python -m MODULE ...`: {service.get('command')}"
        assert module in tested, (
            f"{name}: no test starts `python -m {module}` as a process ({sorted(tested)})"
        )


def test_every_command_is_accepted_by_its_modules_parser(parsed: dict[str, dict[str, Any]]) -> None:
    failed = {what: r["error"] for what, r in parsed.items() if not r["ok"]}
    assert not failed, "\n\n".join(f"{k}:\n{v}" for k, v in failed.items())
    learner = [r for r in parsed.values() if r["module"] == "learner"]
    # service mode: no --run-id, so the learner serves queued runs
    assert learner and all(r["parsed"]["run_id"] == "None" for r in learner)


def test_argv_checker_reports_a_rejected_flag() -> None:
    items = [
        {"module": "services.reward", "args": ["--no-such-flag"]},
        {"module": "services.nope", "args": []},
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_argv.py")],
        input=json.dumps(items), capture_output=True, text=True, cwd=ROOT, timeout=110,
    )  # fmt: skip
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert done.returncode == 1
    assert not first["ok"] and "--no-such-flag" in first["error"]
    assert not second["ok"] and "services.nope" in second["error"]


def test_python_c_healthchecks_compile(doc: dict[str, Any]) -> None:
    for name, service in doc["services"].items():
        test = service["healthcheck"]["test"]
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name}.healthcheck", "exec")
            if "REDIS_URL" in test[3]:
                assert service["environment"]["REDIS_URL"].startswith("redis://redis:"), name


# --- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    """Docker's rule: ``*`` stays within one path component; ``**/`` at the start matches any depth."""
    anywhere = pattern.startswith("**/")
    pat = tuple(pattern.removeprefix("**/").split("/"))
    tails = [parts[i:] for i in range(len(parts))] if anywhere else [parts]
    return any(len(t) == len(pat) and all(map(fnmatch.fnmatchcase, t, pat)) for t in tails)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``rel`` (or a folder above it) out of the build context."""
    parts = Path(rel).parts
    ignored = False
    for pattern in patterns:  # the last matching line wins; ``!`` re-includes
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if any(_matches(parts[: i + 1], pat) for i in range(len(parts))):
            ignored = not negate
    return ignored


def _dockerignore() -> list[str]:
    text = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in text if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    patterns = _dockerignore()
    for rel in (".env", ".venv/bin/python", ".git/HEAD", "services/__pycache__/x.pyc", "runs/r1/ckpt"):
        assert dockerignored(rel, patterns), rel
    assert not dockerignored("services/control/app.py", patterns)


@pytest.mark.parametrize("image", sorted(images.IMAGES))
def test_dockerfile_copies_what_the_image_spec_says(image: str) -> None:
    spec = images.IMAGES[image]
    instructions = dockerfile_instructions(ROOT / spec.dockerfile)
    assert (
        instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
        and ("FROM", "${BASE_IMAGE}") in instructions
    )
    copied: set[str] = set()
    for op, rest in instructions:
        if op != "COPY":
            continue
        assert not rest.startswith("--from"), rest
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{spec.dockerfile}: COPY {source}: no such path"
            assert not dockerignored(source, _dockerignore()), f"{spec.dockerfile}: {source} is dockerignored"
            copied.add(source)
    assert copied == {*spec.copies, "pyproject.toml", "scripts/images.py"}
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[:2] == ["python", "-m"] and cmd[2] in spec.modules
    for module in spec.modules:
        assert importlib.util.find_spec(module) is not None, module
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert f"images.py requirements {image}" in runs


def test_compose_builds_use_declared_args_and_the_right_image(doc: dict[str, Any]) -> None:
    by_file = {spec.dockerfile: spec for spec in images.IMAGES.values()}
    for name, service in doc["services"].items():
        build = service.get("build")
        if build is None:
            continue
        spec = by_file[build["dockerfile"]]
        declared = {
            rest.split("=")[0] for op, rest in dockerfile_instructions(ROOT / spec.dockerfile) if op == "ARG"
        }
        assert set(build.get("args") or {}) <= declared, f"{name}: build args {build.get('args')}"
        assert module_of(service) in spec.modules, f"{name}: {build['dockerfile']} does not hold its module"
        health = service["healthcheck"]["test"]
        if health[:3] == ["CMD", "python", "-m"]:
            assert health[3] in spec.modules, f"{name}: healthcheck module {health[3]} not in the image"


def test_control_image_installs_no_torch() -> None:
    lines = images.requirements("control", ROOT / "pyproject.toml")
    assert not any(images.requirement_name(line) in {"torch", "triton", "transformers"} for line in lines)
    assert "torch" not in images.installed_closure(images.requirement_name(line) for line in lines)
    with pytest.raises(KeyError, match="no-such-dist"):
        images.requirements("control", ROOT / "pyproject.toml", only=["no-such-dist"])


@pytest.mark.parametrize("image", sorted(images.IMAGES))
def test_image_code_imports_with_only_the_image_packages(image: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "images.py"), "check-imports", image],
        capture_output=True, text=True, cwd=ROOT, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


# --- the gRPC healthcheck command, against a real server


def _probe(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.rpc.healthcheck", address, "--timeout-s", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


@pytest.mark.integration
def test_grpc_healthcheck_command_against_a_real_reward_service(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    down = _probe(address)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    proc = ServiceProcess("services.reward", ["--port", str(port), "--workers", "1"], tmp_path / "reward.log")
    try:
        wait_serving(proc, address)
        up = _probe(address)
        assert up.returncode == 0 and "SERVING" in up.stderr, up.stderr
    finally:
        proc.stop()
    assert _probe(address).returncode == 1
