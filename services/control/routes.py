"""The app's route table, flattened: (path, methods, path regex) for every endpoint.

FastAPI ≥ 0.16x keeps included routers as lazy ``_IncludedRouter`` entries in ``app.routes``;
``fastapi.routing.iter_route_contexts`` flattens them (older versions list the routes directly).
Used for the ``Allow`` header of 405 problems and by the test that walks every mutating route.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import routing
from starlette.routing import compile_path

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: frozenset[str]
    regex: re.Pattern[str]


def route_table(routes: Iterable[Any]) -> list[RouteInfo]:
    """Every route with a path and methods, in the app's order."""
    flatten = getattr(routing, "iter_route_contexts", None)
    entries = flatten(list(routes)) if flatten is not None else routes
    table = []
    for entry in entries:
        path, methods = getattr(entry, "path", None), getattr(entry, "methods", None)
        if path is not None and methods:
            table.append(RouteInfo(path, frozenset(methods), compile_path(path)[0]))
    return table
