"""``/v1/verifiers``: register a builtin, gRPC or HTTP verifier (after a reachability check), list them."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response, status

from services.control import probes
from services.control.deps import Authorized, RegistryDep, SettingsDep
from services.control.models import VerifierCreate, VerifierPublic
from services.control.problems import problem_responses
from services.control.settings import ControlSettings

router = APIRouter(prefix="/v1/verifiers", tags=["verifiers"], responses=problem_responses(400, 422, 503))


@router.post(
    "", status_code=status.HTTP_201_CREATED, dependencies=[Authorized],
    responses={**problem_responses(401), 200: {"model": VerifierPublic, "description": "Re-registered"}},
)  # fmt: skip
async def register_verifier(
    body: VerifierCreate, registry: RegistryDep, settings: SettingsDep, response: Response
) -> VerifierPublic:
    """Store a verifier; grpc/http ones must answer first, builtin names are checked when a reward
    service is configured (``DISTILL_REWARD_ADDRESS``)."""
    await _check(body, settings)
    verifier = VerifierPublic(
        name=body.name, kind=body.kind, address=body.address, url=body.url, options=body.options,
        registered_at=time.time(),
    )  # fmt: skip
    if not await registry.put_verifier(verifier):
        response.status_code = status.HTTP_200_OK
    return verifier


@router.get("")
async def list_verifiers(registry: RegistryDep) -> list[VerifierPublic]:
    return await registry.list_verifiers()


async def _check(body: VerifierCreate, settings: ControlSettings) -> None:
    timeout_s = settings.rpc_timeout_s
    if body.kind == "grpc" and body.address is not None:
        await probes.grpc_reachable(body.address, timeout_s)
    elif body.kind == "http" and body.url is not None:
        await probes.http_reachable(body.url, timeout_s)
    elif body.kind == "builtin" and settings.reward_address is not None:
        token = settings.reward_token.get_secret_value() if settings.reward_token else None
        await probes.builtin_verifier(body.name, settings.reward_address, timeout_s, token)
