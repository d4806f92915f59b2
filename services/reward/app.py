"""The reward service process: settings → worker pool, sandbox, verifiers → gRPC server.

``python -m services.reward --port 50061 [--verifiers verifiers.yaml] [--token T]`` (see
``--help``). Health turns SERVING once the workers are up and the sandbox probe has run; if
the sandbox cannot confine code here, ``code`` reports ERROR for every item (fail closed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from pydantic import ValidationError

from proto.distill.v1 import reward_pb2_grpc as pb_grpc
from services.reward.config import (
    BuiltinSpec,
    GrpcSpec,
    HttpSpec,
    PythonSpec,
    RewardSettings,
    VerifierSpec,
    load_verifiers_file,
)
from services.reward.domain import VerifierInfo
from services.reward.engine import RewardEngine
from services.reward.errors import ConfigError, SandboxUnavailableError, VerifierFailure
from services.reward.pool import WorkerPool, load_callable
from services.reward.remote import GrpcVerifier, HttpVerifier, RemotePolicy
from services.reward.sandbox import Sandbox, SandboxConfig, SandboxLimits
from services.reward.servicer import SERVICE_NAME, RewardServicer
from services.reward.verifiers.base import FunctionVerifier, Verifier
from services.reward.verifiers.registry import Runtime, VerifierSet, build_builtin, builtin_names
from services.rpc.server import ServerOptions, ServiceSpec, serve

log = logging.getLogger(__name__)
PRELOAD = ("services.reward.verifiers.builtin", "math_verify")


def _remote_policy(spec: HttpSpec | GrpcSpec) -> RemotePolicy:
    return RemotePolicy(spec.attempt_timeout_s, spec.attempts, spec.backoff_s, spec.max_concurrency)


def _token(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    if env_name not in os.environ:
        raise ConfigError(f"token_env: environment variable {env_name!r} is not set")
    return os.environ[env_name]


def build_verifier(spec: VerifierSpec, rt: Runtime) -> Verifier:
    if isinstance(spec, BuiltinSpec):
        return build_builtin(spec.name, spec.builtin, spec.options, spec.timeout_s, rt)
    info = VerifierInfo(
        spec.name,
        spec.kind,
        tuple(spec.rewards),
        tuple(spec.required_fields),
        f"user verifier ({spec.kind})",
        {},
        spec.timeout_s,
    )
    if isinstance(spec, PythonSpec):
        try:
            load_callable(spec.target)  # fail at start-up, not on the first item
        except VerifierFailure as err:
            raise ConfigError(f"verifier {spec.name!r}: {err}") from err
        return FunctionVerifier(info, spec.timeout_s, spec.target, {}, rt.pool)
    if isinstance(spec, HttpSpec):
        return HttpVerifier(info, spec.timeout_s, spec.url, _remote_policy(spec), _token(spec.token_env))
    return GrpcVerifier(
        info,
        spec.timeout_s,
        spec.address,
        spec.remote_name,
        _remote_policy(spec),
        _token(spec.token_env),
        spec.tls_ca,
    )


def build_verifiers(settings: RewardSettings, rt: Runtime) -> VerifierSet:
    extra = load_verifiers_file(settings.verifiers)
    names = builtin_names() if extra.builtins is None else extra.builtins
    specs: list[VerifierSpec] = [
        BuiltinSpec(kind="builtin", name=n, builtin=n, timeout_s=settings.builtin_timeout_s) for n in names
    ]
    return VerifierSet(build_verifier(s, rt) for s in [*specs, *extra.verifiers])


class RewardService:
    """Owns the worker pool, the sandbox and the verifiers of one process."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        limits = SandboxLimits(
            wall_s=settings.sandbox_wall_s,
            cpu_s=settings.sandbox_cpu_s,
            memory_bytes=settings.sandbox_memory_mb * 1024 * 1024,
            processes=settings.sandbox_processes,
        )
        sandbox_cfg = SandboxConfig(
            limits=limits,
            max_concurrency=settings.sandbox_slots,
            python=settings.sandbox_python,
            uid_base=settings.sandbox_uid_base,
        )
        self.pool = WorkerPool(settings.workers, PRELOAD)
        self.sandbox = Sandbox(sandbox_cfg)
        self.runtime = Runtime(self.pool, self.sandbox, settings.code_case_timeout_s)
        self.verifiers = build_verifiers(settings, self.runtime)
        self.engine = RewardEngine(self.verifiers, settings.default_timeout_s)

    async def start(self) -> None:
        self.pool.start()
        await self.pool.ready()
        try:
            await self.sandbox.probe()
        except SandboxUnavailableError as err:
            log.error("code verifier disabled, it will report ERROR for every item: %s", err)

    async def close(self) -> None:
        await self.verifiers.close()
        self.pool.close()

    def service_spec(self) -> ServiceSpec:
        servicer = RewardServicer(self.engine)
        return ServiceSpec(
            SERVICE_NAME, lambda server: pb_grpc.add_RewardServiceServicer_to_server(servicer, server)
        )


def parse_settings(argv: list[str] | None = None) -> RewardSettings:
    parser = argparse.ArgumentParser(
        prog="python -m services.reward",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, field in RewardSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, help=f"(default: {field.default})")
    parser.add_argument("--log-level", default="INFO")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=args.pop("log_level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    given = {k: v for k, v in args.items() if v is not None}
    if "token" not in given and os.environ.get("DISTILL_REWARD_TOKEN"):
        given["token"] = os.environ["DISTILL_REWARD_TOKEN"]  # keeps the secret out of `ps`
    try:
        return RewardSettings.model_validate(given)
    except ValidationError as err:
        parser.error(str(err))
        raise AssertionError("unreachable: parser.error exits") from err


async def run(settings: RewardSettings) -> None:
    service = RewardService(settings)
    opts = ServerOptions(
        host=settings.host,
        port=settings.port,
        token=settings.token,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        grace_s=settings.grace_s,
    )
    await serve([service.service_spec()], opts, service.start, service.close)


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        asyncio.run(run(settings))
    except ConfigError as err:
        raise SystemExit(f"reward service: {err}") from err
