"""Domain errors of the control plane; ``problems.py`` alone turns them into HTTP problem bodies."""

from __future__ import annotations


class ControlError(Exception):
    """Base: ``status`` is the HTTP status the edge maps it to, ``field`` the input it concerns."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.field = detail, field


class NotFound(ControlError):
    status, title = 404, "Not found"


class Conflict(ControlError):
    status, title = 409, "Conflict"


class Invalid(ControlError):
    """Well-formed input that the platform refuses (unknown teacher, unreachable address, ...)."""

    status, title = 422, "Unprocessable input"


class Unauthorized(ControlError):
    status, title = 401, "Unauthorized"


class Unavailable(ControlError):
    """A dependency (Redis) does not answer."""

    status, title = 503, "Service unavailable"
