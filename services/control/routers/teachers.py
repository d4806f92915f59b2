"""``/v1/teachers``: register a teacher after its ``Info`` and health, list, get, delete."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response, status

from services.control import probes
from services.control.deps import Authorized, RegistryDep, SettingsDep
from services.control.models import TeacherCreate, TeacherPublic
from services.control.problems import problem_responses

router = APIRouter(prefix="/v1/teachers", tags=["teachers"], responses=problem_responses(400, 404, 422, 503))


@router.post(
    "", status_code=status.HTTP_201_CREATED, dependencies=[Authorized],
    responses={**problem_responses(401), 200: {"model": TeacherPublic, "description": "Re-registered"}},
)  # fmt: skip
async def register_teacher(
    body: TeacherCreate, registry: RegistryDep, settings: SettingsDep, response: Response
) -> TeacherPublic:
    """Call the teacher's health and ``Info``; store what it reports (201 new, 200 re-registered)."""
    token = settings.teacher_token.get_secret_value() if settings.teacher_token else None
    info = await probes.teacher_info(body.address, settings.rpc_timeout_s, token)
    teacher = TeacherPublic(
        name=body.name, address=body.address, weight=body.weight, model_name=info.model_name,
        vocab_size=info.vocab_size, tokenizer_fingerprint=info.tokenizer_fingerprint,
        max_sequence_length=info.max_sequence_length, backend=info.backend, registered_at=time.time(),
    )  # fmt: skip
    response.headers["Location"] = f"/v1/teachers/{body.name}"
    if not await registry.put_teacher(teacher):
        response.status_code = status.HTTP_200_OK
    return teacher


@router.get("")
async def list_teachers(registry: RegistryDep) -> list[TeacherPublic]:
    return await registry.list_teachers()


@router.get("/{name}")
async def get_teacher(name: str, registry: RegistryDep) -> TeacherPublic:
    return await registry.get_teacher(name)


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Authorized],
    responses=problem_responses(401, 409),
)  # fmt: skip
async def delete_teacher(name: str, registry: RegistryDep) -> None:
    """Forget a teacher; 409 while a queued or running run uses it."""
    await registry.delete_teacher(name)
