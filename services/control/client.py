"""A small synchronous client of the REST API (httpx), used by the ``distill`` CLI.

Every non-2xx answer becomes :class:`ApiError` carrying the RFC 9457 problem body, so callers
print the server's own reason; an unreachable server becomes :class:`ApiUnreachable`.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from services.control.settings import DEV_TOKEN

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API answered with an error; ``problem`` is its problem body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        title, detail = problem.get("title", "error"), problem.get("detail")
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))


class ApiUnreachable(Exception):
    """No answer from the control plane at all."""


class ApiClient:
    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.base_url = base_url or os.environ.get("DISTILL_API_URL", DEFAULT_URL)
        token = token or os.environ.get("DISTILL_TOKEN", DEV_TOKEN)
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON body (None for 204); ApiError / ApiUnreachable otherwise."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(f"cannot reach the control plane at {self.base_url}: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise ApiError(response.status_code, problem)
        return response.json() if response.content else None

    def create_run(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self.request("POST", "/v1/runs", json=spec, headers=headers)
        return result

    def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/runs/{run_id}")
        return result

    def list_runs(self, status: str | None = None) -> list[dict[str, Any]]:
        """All runs (following the cursor), optionally of one status."""
        runs: list[dict[str, Any]] = []
        cursor: str | None = "0"
        while cursor is not None:
            params = {"cursor": cursor, **({"status": status} if status else {})}
            page = self.request("GET", "/v1/runs", params=params)
            runs.extend(page["runs"])
            cursor = page["next_cursor"]
        return runs

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """The whole metrics series of a run, oldest first."""
        points: list[dict[str, Any]] = []
        since: str | None = None
        while True:
            params = {"since": since} if since else {}
            page = self.request("GET", f"/v1/runs/{run_id}/metrics", params=params)
            points.extend(page["points"])
            since = page["next"]
            if since is None:
                return points
