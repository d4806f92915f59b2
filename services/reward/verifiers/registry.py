"""Registry of built-in verifiers (``register_builtin`` / ``get_builtin``) and the served set.

Built-ins, by registry name: ``exact_match``, ``math``, ``regex``, ``code``, ``length_penalty``,
``format``. Each is served under its own name with default options, and can be served again
under another name with other options (e.g. a case-sensitive exact match). Every built-in
produces one reward, named like the verifier that serves it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from services.reward.domain import Item, VerifierInfo
from services.reward.errors import ConfigError, MissingReferenceError, UnknownVerifierError
from services.reward.pool import WorkerPool, load_callable
from services.reward.sandbox import Sandbox
from services.reward.verifiers.base import FunctionVerifier, Verifier
from services.reward.verifiers.code import CodeVerifier


@dataclass(frozen=True)
class Builtin:
    target: str  # module:function of the scoring function (see verifiers/builtin.py)
    reward_names: tuple[str, ...]
    field_options: tuple[str, ...]  # options whose value names a required reference field
    inline: bool  # linear-time and never runs user input as code/regex: no worker round trip
    description: str
    quick: str | None = None  # module:function answering inline when it can (None: go to the pool)


@dataclass
class Runtime:
    """What verifiers may need from the service: the worker pool and the sandbox."""

    pool: WorkerPool
    sandbox: Sandbox | None
    code_case_timeout_s: float = 2.0


_BUILTINS: dict[str, Builtin] = {}
_B = "services.reward.verifiers.builtin:"


def register_builtin(name: str, spec: Builtin) -> None:
    if name in _BUILTINS:
        raise ConfigError(f"built-in verifier {name!r} registered twice")
    _BUILTINS[name] = spec


def get_builtin(name: str) -> Builtin:
    if name not in _BUILTINS:
        raise ConfigError(f"unknown built-in verifier {name!r}; valid: {sorted(_BUILTINS)}")
    return _BUILTINS[name]


def builtin_names() -> list[str]:
    return sorted(_BUILTINS)


register_builtin(
    "exact_match",
    Builtin(
        _B + "exact_match",
        ("exact_match",),
        ("field",),
        True,
        "normalized final answer equals reference 'answer'",
    ),
)
register_builtin(
    "math",
    Builtin(
        _B + "math_equiv",
        ("math",),
        ("field",),
        False,
        "final answer (\\boxed{} or 'answer:') equals reference 'answer' (math-verify)",
        quick=_B + "math_quick",
    ),
)
register_builtin(
    "regex",
    Builtin(
        _B + "regex_match",
        ("regex",),
        ("field",),
        False,
        "reference 'pattern' (a regex) matches the response",
    ),
)
register_builtin(
    "length_penalty",
    Builtin(
        _B + "length_penalty",
        ("length_penalty",),
        (),
        True,
        "0 within the length limit, down to -1 beyond it",
    ),
)
register_builtin(
    "format",
    Builtin(
        _B + "format_check", ("format",), (), False, "the response matches the configured format pattern"
    ),
)
register_builtin(
    "code",
    Builtin(
        "",
        ("code",),
        (),
        False,
        "Python program in the response passes reference 'tests' or 'test_code', sandboxed",
    ),
)


def _defaults(target: str) -> dict[str, Any]:
    params = inspect.signature(load_callable(target)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_builtin(
    name: str, builtin: str, options: dict[str, Any], timeout_s: float, rt: Runtime
) -> Verifier:
    """Verifier ``name`` serving built-in ``builtin`` with ``options`` (checked against its signature)."""
    spec = get_builtin(builtin)
    if builtin == "code":
        if options:
            raise ConfigError(f"verifier {name!r}: built-in 'code' takes no options, got {sorted(options)}")
        if rt.sandbox is None:
            raise ConfigError(f"verifier {name!r}: no sandbox configured for built-in 'code'")
        info = VerifierInfo(name, "code", (name,), (), spec.description, {}, timeout_s)
        return CodeVerifier(info, timeout_s, rt.sandbox, rt.code_case_timeout_s)
    defaults = _defaults(spec.target)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"verifier {name!r}: unknown option(s) {unknown} for {builtin!r}; valid: {sorted(defaults)}"
        )
    merged = {**defaults, **options}
    fields = tuple(str(merged[o]) for o in spec.field_options if o in merged)
    if builtin == "length_penalty":
        fields = ()  # its reference field only overrides the configured limit
    # Served under another name, a built-in's single reward takes that name: reward names stay unique.
    info = VerifierInfo(name, builtin, (name,), fields, spec.description, merged, timeout_s)
    pool = None if spec.inline else rt.pool
    return FunctionVerifier(info, timeout_s, spec.target, merged, pool, spec.reward_names, spec.quick)


class VerifierSet:
    """The verifiers one service serves, by name; validates requests before any work starts."""

    def __init__(self, verifiers: Iterable[Verifier]) -> None:
        self.by_name: dict[str, Verifier] = {}
        for v in verifiers:
            if v.name in self.by_name:
                raise ConfigError(f"two verifiers are named {v.name!r}")
            self.by_name[v.name] = v

    def infos(self) -> list[VerifierInfo]:
        return [v.info for v in self.by_name.values()]

    def validate(self, items: Sequence[Item]) -> None:
        """Raise UnknownVerifierError / MissingReferenceError naming the first problem found."""
        unknown = [n for it in items for n in it.verifiers if n not in self.by_name]
        if unknown:
            raise UnknownVerifierError(unknown, list(self.by_name))
        for i, item in enumerate(items):
            for name in item.verifiers:
                missing = self.by_name[name].missing_fields(item.reference)
                if missing:
                    raise MissingReferenceError(i, name, missing)

    async def close(self) -> None:
        for v in self.by_name.values():
            await v.close()
