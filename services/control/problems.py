"""RFC 9457 problem bodies: the one place where errors become HTTP responses.

Domain errors (``errors.py``), request validation errors (422 naming the field, e.g.
``teachers[0].name``), Starlette's own 404/405, Redis outages (503) and anything unexpected
(500) all leave as ``application/problem+json``. ``problem_responses`` documents them in OpenAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.control.errors import ControlError, Unauthorized
from services.control.models import Problem
from services.control.routes import route_table

log = logging.getLogger(__name__)
PROBLEM_MEDIA_TYPE = "application/problem+json"
_LOCATIONS = ("body", "query", "path", "header", "cookie")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    request: Request, status: int, detail: str | None, *, title: str | None = None,
    errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None,
) -> ProblemResponse:  # fmt: skip
    phrase = HTTPStatus(status).phrase
    body = Problem(
        type=f"urn:distill:problem:{phrase.lower().replace(' ', '-')}",
        title=title or phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    return ProblemResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def field_name(loc: Sequence[int | str]) -> str:
    """``("body", "teachers", 0, "name")`` → ``teachers[0].name``."""
    parts = list(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or (str(loc[0]) if loc else "body")


def _validation_entry(err: dict[str, Any]) -> dict[str, Any]:
    field, message = field_name(err["loc"]), str(err["msg"])
    if err.get("type") == "json_invalid":  # loc is (body, character offset)
        field = "body"
    # Model validators name their field as "field: reason"; surface it as the field.
    reason = message.removeprefix("Value error, ")
    head, sep, rest = reason.partition(": ")
    if sep and field in ("", "body") and " " not in head.replace(", ", ","):
        field, reason = head, rest
    return {"field": field, "in": str(err["loc"][0]) if err["loc"] else "body", "message": reason}


async def _on_validation(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_validation_entry(e) for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return problem(request, 422, detail, title="Invalid request", errors=errors)


async def _on_domain(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ControlError)
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="distill"'}
    errors = [{"field": exc.field, "message": exc.detail}] if exc.field else None
    return problem(request, exc.status, exc.detail, title=exc.title, errors=errors, headers=headers)


async def _on_http(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette lists only the first matching route's methods; a path has one route per method.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem(request, exc.status_code, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in route_table(request.app.routes):
        if route.regex.match(request.url.path):
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def _on_redis(request: Request, exc: Exception) -> ProblemResponse:
    log.warning("redis unavailable during %s %s: %r", request.method, request.url.path, exc)
    detail = "the platform's Redis does not answer; retry later"
    return problem(request, 503, detail, headers={"Retry-After": "1"})


class UnexpectedErrors:
    """ASGI middleware: anything unhandled becomes a logged 500 problem.

    Not an ``Exception`` handler: Starlette runs those in ``ServerErrorMiddleware``, which re-raises
    after answering, so uvicorn drops the client's keep-alive connection with the 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # too late for a problem body; let the server close the connection
                raise
            request = Request(scope)
            log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
            await problem(request, 500, "internal error; see the control plane's log")(scope, receive, send)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(ControlError, _on_domain)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(redis.exceptions.ConnectionError, _on_redis)
    app.add_exception_handler(redis.exceptions.TimeoutError, _on_redis)
    app.add_middleware(UnexpectedErrors)


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``codes``, each a problem+json body."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        code: {"model": Problem, "description": HTTPStatus(code).phrase,
               "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}
        for code in codes
    }  # fmt: skip
