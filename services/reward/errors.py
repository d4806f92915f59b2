"""Domain errors of the reward service; only the servicer translates them into gRPC statuses."""

from __future__ import annotations


class RewardError(Exception):
    """Base of every error the reward service raises on purpose."""


class InvalidRequestError(RewardError):
    """The caller sent something we cannot verify; the message names the field."""


class UnknownVerifierError(InvalidRequestError):
    def __init__(self, names: list[str], known: list[str]) -> None:
        super().__init__(f"unknown verifier(s) {sorted(set(names))}; known: {sorted(known)}")


class MissingReferenceError(InvalidRequestError):
    def __init__(self, item: int, verifier: str, fields: list[str]) -> None:
        super().__init__(f"items[{item}].reference is missing {fields} required by verifier '{verifier}'")


class ConfigError(RewardError):
    """A verifier configuration (built-in options, plugin spec, remote endpoint) is invalid."""


class VerifierFailure(RewardError):
    """A verifier could not produce a value for an item (reported as status ERROR)."""


class VerifierTimeout(RewardError):
    """A verifier ran past its time for an item (reported as status TIMEOUT)."""


class RemoteUnavailableError(RewardError):
    """A remote verifier kept failing with transient errors after its retries (status UNAVAILABLE)."""


class SandboxUnavailableError(RewardError):
    """The code sandbox cannot confine a program here; code is refused, never run unconfined."""
