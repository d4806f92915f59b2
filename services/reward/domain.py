"""Wire-independent types of the reward service: an item to verify and the rewards it gets."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class Status(enum.Enum):
    OK = "ok"
    ERROR = "error"  # the verifier failed on this item (bad reference, crash, sandbox limit)
    TIMEOUT = "timeout"  # the verifier ran past its time for this item
    UNAVAILABLE = "unavailable"  # a remote verifier kept failing transiently; we gave up


@dataclass(frozen=True)
class Item:
    prompt: str
    response: str
    reference: Mapping[str, str]
    verifiers: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """What a verifier computed for one item: one value per reward name, and a short detail."""

    values: dict[str, float]
    detail: str = ""


@dataclass(frozen=True)
class Reward:
    verifier: str
    name: str
    value: float  # NaN unless status is OK: a failure must never read as a score of 0
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class VerifierInfo:
    name: str
    kind: str  # builtin name, "python", "http" or "grpc"
    reward_names: tuple[str, ...]
    required_fields: tuple[str, ...] = ()
    description: str = ""
    options: dict[str, object] = field(default_factory=dict)
    timeout_s: float = 0.0  # the verifier's own per-item limit


def failed(verifier: str, names: tuple[str, ...], status: Status, detail: str) -> list[Reward]:
    """The rewards of a verifier that produced nothing: each carries the failure, value NaN."""
    return [Reward(verifier, n, math.nan, status, detail[:300]) for n in names]
