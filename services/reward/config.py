"""Typed configuration of the reward service: server settings and the verifiers file.

The verifiers file (YAML or JSON, ``--verifiers path``) lists extra verifiers; every built-in
is also served under its own name unless ``builtins`` narrows the list::

    builtins: [exact_match, math, code]
    verifiers:
      - {kind: builtin, name: exact_cs, builtin: exact_match, options: {case_sensitive: true}}
      - {kind: python, name: my_score, target: mypkg.scoring:score, rewards: [my_score]}
      - {kind: http, name: judge, url: "http://127.0.0.1:8000/verify", rewards: [judge], attempts: 3}
      - {kind: grpc, name: far_math, address: "10.0.0.5:50061", remote_name: math, rewards: [math]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.reward.errors import ConfigError

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
Seconds = Annotated[float, Field(gt=0, le=3600)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    timeout_s: Seconds = 30.0  # per-item limit of this verifier


class BuiltinSpec(_Spec):
    kind: Literal["builtin"]
    builtin: str
    options: dict[str, Any] = {}


class _UserSpec(_Spec):
    rewards: Annotated[list[Name], Field(min_length=1)]  # reward names it produces, in order
    required_fields: list[str] = []  # reference fields every item must carry


class PythonSpec(_UserSpec):
    kind: Literal["python"]
    target: Annotated[str, Field(pattern=r"^[\w.]+:\w+$")]  # module:function, run in the worker pool


class _RemoteSpec(_UserSpec):
    attempt_timeout_s: Seconds = 10.0
    attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0, le=60)] = 0.2
    max_concurrency: Annotated[int, Field(ge=1, le=4096)] = 8
    token_env: str | None = None  # environment variable holding the bearer token to send


class HttpSpec(_RemoteSpec):
    kind: Literal["http"]
    url: Annotated[str, Field(pattern=r"^https?://")]


class GrpcSpec(_RemoteSpec):
    kind: Literal["grpc"]
    address: str  # host:port
    remote_name: str  # the verifier's name on the remote service
    tls_ca: Path | None = None


VerifierSpec = Annotated[BuiltinSpec | PythonSpec | HttpSpec | GrpcSpec, Field(discriminator="kind")]


class VerifiersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    builtins: list[str] | None = None  # built-ins served under their own names (None: all)
    verifiers: list[VerifierSpec] = []


class RewardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 50061
    token: str | None = None  # bearer token required from callers
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: Seconds = 10.0
    workers: Annotated[int, Field(ge=1, le=256)] = 2  # worker processes for CPU-bound verifiers
    default_timeout_s: Seconds = 30.0  # per-item budget when the request gives none
    builtin_timeout_s: Seconds = 10.0  # per-item limit of the default built-ins
    sandbox_slots: Annotated[int, Field(ge=1, le=256)] = 4  # code runs at once
    sandbox_wall_s: Seconds = 10.0
    sandbox_cpu_s: Annotated[int, Field(ge=1, le=3600)] = 5
    sandbox_memory_mb: Annotated[int, Field(ge=64, le=65536)] = 512
    sandbox_processes: Annotated[int, Field(ge=2, le=4096)] = 16
    sandbox_python: str | None = None  # interpreter for sandboxed code (default: found automatically)
    sandbox_uid_base: Annotated[int, Field(ge=1000, le=2**31 - 4096)] = (
        61000  # as root: slot i runs as base+i
    )
    code_case_timeout_s: Seconds = 2.0  # per test case inside one run
    verifiers: Path | None = None  # the verifiers file


def load_verifiers_file(path: Path | None) -> VerifiersFile:
    if path is None:
        return VerifiersFile()
    try:
        data = yaml.safe_load(path.read_text())
        return VerifiersFile.model_validate(data or {})
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read verifiers file {path}: {err}") from err
    except ValidationError as err:
        raise ConfigError(f"invalid verifiers file {path}: {err}") from err
