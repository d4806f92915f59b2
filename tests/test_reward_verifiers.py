"""Built-in scoring functions, the registry, the worker pool and the engine's statuses (in-process)."""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.reward.domain import Item, Outcome, Status
from services.reward.engine import RewardEngine
from services.reward.errors import (
    ConfigError,
    InvalidRequestError,
    MissingReferenceError,
    UnknownVerifierError,
    VerifierFailure,
)
from services.reward.pool import WorkerPool, as_outcome
from services.reward.sandbox import Sandbox, SandboxConfig
from services.reward.verifiers import builtin as b
from services.reward.verifiers.base import FunctionVerifier
from services.reward.verifiers.code import extract_program, parse_tests
from services.reward.verifiers.registry import Runtime, VerifierSet, build_builtin, get_builtin

USER_MODULE = textwrap.dedent(
    """
    import time

    def sleepy(prompt, response, reference):
        time.sleep(float(reference.get("sleep", "0")))
        return 1.0, "woke up"

    def broken(prompt, response, reference):
        raise RuntimeError("user bug")

    def not_finite(prompt, response, reference):
        return {"nf": float("nan")}
    """
)


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "user_verifiers_mod.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))  # the spawned workers inherit sys.path
    yield "user_verifiers_mod"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("user_verifiers_mod", None)


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    p = WorkerPool(2, ("services.reward.verifiers.builtin",))
    p.start()
    await p.ready()
    yield p
    p.close()


def test_exact_match_normalization_and_extraction() -> None:
    ref = {"answer": "New York"}
    assert b.exact_match("", "Answer: new   york", ref).values["exact_match"] == 1.0
    assert b.exact_match("", "Answer: new york", ref, case_sensitive=True).values["exact_match"] == 0.0
    assert (
        b.exact_match("", "so \\boxed{New York.}", ref, strip_punctuation=True).values["exact_match"] == 1.0
    )
    assert b.exact_match("", "so \\boxed{New York.}", ref).values["exact_match"] == 0.0
    missing = b.exact_match("", "I think new york", ref, extract="boxed")
    assert missing.values["exact_match"] == 0.0 and "no final answer" in missing.detail


def test_last_boxed_balances_braces() -> None:
    assert b.last_boxed("x \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert b.last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("response", "gold", "want"),
    [
        ("Therefore \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("The final answer: 1/2", "\\frac{1}{2}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{3}", "4", 0.0),
    ],
)
def test_math_equivalence(response: str, gold: str, want: float) -> None:
    assert b.math_equiv("", response, {"answer": gold}).values["math"] == want


def test_math_without_final_answer_scores_zero_with_reason() -> None:
    out = b.math_equiv("", "I am not sure", {"answer": "2"})
    assert out.values["math"] == 0.0 and "no final answer" in out.detail


def test_regex_and_invalid_pattern() -> None:
    assert b.regex_match("", "id: AB-12", {"pattern": r"[A-Z]{2}-\d+"}).values["regex"] == 1.0
    assert (
        b.regex_match("", "id: AB-12", {"pattern": r"[A-Z]{2}-\d+"}, mode="fullmatch").values["regex"] == 0.0
    )
    with pytest.raises(VerifierFailure, match="not a valid regex"):
        b.regex_match("", "x", {"pattern": "(unclosed"})


def test_length_penalty_and_format() -> None:
    assert b.length_penalty("", "a b c", {}, max_length=4).values["length_penalty"] == 0.0
    assert b.length_penalty("", "a b c d e f", {}, max_length=4).values["length_penalty"] == pytest.approx(
        -0.5
    )
    assert b.length_penalty("", "a " * 100, {"max_length": "10"}).values["length_penalty"] == -1.0
    with pytest.raises(VerifierFailure, match="max_length"):
        b.length_penalty("", "a", {"max_length": "ten"})
    assert b.format_check("", "work... Answer: 3", {}).values["format"] == 1.0
    assert b.format_check("", "just text", {}).values["format"] == 0.0


def test_extract_program_and_parse_tests() -> None:
    text = "```text\nnope\n```\n```python\nprint(1)\n```\n```py\nprint(2)\n```"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("no code") is None
    assert parse_tests('[{"input": "1", "output": "2"}]') == [{"input": "1", "output": "2"}]
    for bad in ("not json", "[]", '[{"input": 1, "output": "2"}]'):
        with pytest.raises(VerifierFailure, match="tests"):
            parse_tests(bad)


def test_as_outcome_shapes_and_checks() -> None:
    assert as_outcome(1, ("r",)) == Outcome({"r": 1.0})
    assert as_outcome((0.5, "half"), ("r",)) == Outcome({"r": 0.5}, "half")
    with pytest.raises(VerifierFailure, match=r"no value for \['s'\]"):
        as_outcome({"r": 1.0}, ("r", "s"))
    with pytest.raises(VerifierFailure, match="non-number"):
        as_outcome("high", ("r",))


def test_registry_errors_name_the_valid_choices(pool: WorkerPool) -> None:
    with pytest.raises(ConfigError, match=r"valid: .*exact_match"):
        get_builtin("exactish")
    rt = Runtime(pool, None)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['casesensitive'\]"):
        build_builtin("em", "exact_match", {"casesensitive": True}, 5.0, rt)
    with pytest.raises(ConfigError, match="no sandbox"):
        build_builtin("code", "code", {}, 5.0, rt)


def test_verifier_set_validation_names_fields(pool: WorkerPool) -> None:
    rt = Runtime(pool, None)
    vs = VerifierSet([build_builtin("math", "math", {}, 5.0, rt), build_builtin("rx", "regex", {}, 5.0, rt)])
    with pytest.raises(UnknownVerifierError, match=r"\['nope'\].*known: \['math', 'rx'\]"):
        vs.validate([Item("p", "r", {"answer": "1"}, ("math", "nope"))])
    with pytest.raises(MissingReferenceError, match=r"items\[1\].reference is missing \['pattern'\].*'rx'"):
        vs.validate([Item("p", "r", {"pattern": "x"}, ("rx",)), Item("p", "r", {}, ("rx",))])


async def test_engine_statuses_and_deadline(user_module: str, pool: WorkerPool) -> None:
    def fn(name: str, target: str, rewards: tuple[str, ...]) -> FunctionVerifier:
        from services.reward.domain import VerifierInfo

        return FunctionVerifier(
            VerifierInfo(name, "python", rewards), 30.0, f"{user_module}:{target}", {}, pool
        )

    rt = Runtime(pool, None)
    engine = RewardEngine(
        VerifierSet(
            [
                fn("sleepy", "sleepy", ("sleepy",)),
                fn("broken", "broken", ("broken",)),
                fn("nf", "not_finite", ("nf",)),
                build_builtin("exact_match", "exact_match", {}, 5.0, rt),
            ]
        )
    )  # fmt: skip
    items = [
        Item("p", "r", {"sleep": "30"}, ("sleepy",)),
        Item("p", "Answer: 7", {"answer": "7"}, ("exact_match", "broken", "nf")),
    ]
    start = time.monotonic()
    slow, fast = await engine.verify(items, timeout_s=1.0)
    assert time.monotonic() - start < 3.0  # the sleeping item did not hold the batch
    assert slow[0].status is Status.TIMEOUT and math.isnan(slow[0].value)
    assert [(r.name, r.status) for r in fast] == [
        ("exact_match", Status.OK), ("broken", Status.ERROR), ("nf", Status.ERROR)
    ]  # fmt: skip
    assert "user bug" in fast[1].detail and math.isnan(fast[1].value)
    # The stuck worker was replaced: the pool still answers at full size.
    again = await engine.verify([Item("p", "r", {"sleep": "0"}, ("sleepy",))] * 4, timeout_s=20.0)
    assert all(r[0].status is Status.OK for r in again)


async def test_engine_rejects_bad_batches(pool: WorkerPool) -> None:
    engine = RewardEngine(VerifierSet([build_builtin("math", "math", {}, 5.0, Runtime(pool, None))]))
    with pytest.raises(InvalidRequestError, match="items: the batch is empty"):
        await engine.verify([])
    with pytest.raises(InvalidRequestError, match=r"items\[0\].verifiers is empty"):
        await engine.verify([Item("p", "r", {}, ())])
    with pytest.raises(InvalidRequestError, match="names a verifier twice"):
        await engine.verify([Item("p", "r", {"answer": "1"}, ("math", "math"))])
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        await engine.verify([Item("p", "r", {"answer": "1"}, ("math",))], timeout_s=float("nan"))


async def test_catastrophic_regex_is_killed_at_its_deadline(pool: WorkerPool) -> None:
    engine = RewardEngine(VerifierSet([build_builtin("regex", "regex", {}, 1.0, Runtime(pool, None))]))
    evil = Item("p", "a" * 40 + "!", {"pattern": "(a+)+$"}, ("regex",))
    fine = Item("p", "abc", {"pattern": "b"}, ("regex",))
    start = time.monotonic()
    (stuck,), (ok,) = await engine.verify([evil, fine])
    assert time.monotonic() - start < 3.0
    assert stuck.status is Status.TIMEOUT and ok.status is Status.OK and ok.value == 1.0
    (after,) = (await engine.verify([fine]))[0]
    assert after.status is Status.OK


async def test_code_verifier_fails_closed_without_a_sandbox(pool: WorkerPool, tmp_path: Path) -> None:
    # An interpreter nobody else may reach makes confinement impossible: refuse, never run.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    sandbox = Sandbox(SandboxConfig(python=str(private / "python3")))
    rt = Runtime(pool, sandbox)
    engine = RewardEngine(VerifierSet([build_builtin("code", "code", {}, 5.0, rt)]))
    marker = tmp_path / "ran"
    program = f"```python\nopen({str(marker)!r}, 'w').write('x')\n```"
    ((reward,),) = await engine.verify([Item("p", program, {"test_code": "pass"}, ("code",))])
    assert reward.status is Status.ERROR and not marker.exists()
    assert math.isnan(reward.value)


def test_inline_builtins_do_not_need_the_pool() -> None:
    dummy = WorkerPool(1)  # never started: inline verifiers must not touch it
    v = build_builtin("exact_match", "exact_match", {}, 5.0, Runtime(dummy, None))
    assert isinstance(v, FunctionVerifier) and v.pool is None
    out = asyncio.run(v.verify(Item("p", "Answer: 4", {"answer": "4"}, ("exact_match",))))
    assert out.values == {"exact_match": 1.0}


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        ("42", "42"), ("42", "41"), ("-3", "-3.0"), ("0.5", "\\frac{1}{2}"), ("\\frac{3}{4}", "0.75"),
        ("\\frac{1}{3}", "0.333333"), ("\\frac{1}{3}", "0.33"), ("7", "\\dfrac{14}{2}"),
        ("2/3", "\\frac{4}{6}"),
        ("1000000", "1000001"), ("0", "-0"), ("3.14159", "3.1416"),
    ],
)  # fmt: skip
def test_plain_number_shortcut_agrees_with_math_verify(gold: str, answer: str) -> None:
    from math_verify import parse, verify

    shortcut = b._plain_verdict(gold, answer)
    full = bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))
    assert shortcut is None or shortcut == full, (gold, answer, shortcut, full)
    assert b.math_equiv("", f"\\boxed{{{answer}}}", {"answer": gold}).values["math"] == float(full)


@pytest.mark.parametrize(
    "response",
    ["answer: " + "." * 200_000 + "x", "answer: " + " " * 200_000, "answer " * 50_000, "\\boxed{" * 50_000],
)
def test_inline_verifiers_stay_linear_on_adversarial_responses(response: str) -> None:
    # exact_match and length_penalty run on the event loop: a quadratic regex here would stall
    # the whole service (this test would then hit the per-test timeout).
    assert b.exact_match("", response, {"answer": "x"}).values["exact_match"] in (0.0, 1.0)
    assert b.length_penalty("", response, {}).values["length_penalty"] <= 0.0


def test_math_settles_plain_numbers_without_the_pool() -> None:
    dummy = WorkerPool(1)  # never started: a call into it would wait forever
    v = build_builtin("math", "math", {}, 5.0, Runtime(dummy, None))
    item = Item("p", "so \\boxed{\\frac{2}{4}}", {"answer": "0.5"}, ("math",))
    assert asyncio.run(asyncio.wait_for(v.verify(item), 5.0)).values == {"math": 1.0}
    symbolic = Item("p", "\\boxed{x^2+2x+1}", {"answer": "(x+1)^2"}, ("math",))
    with pytest.raises(TimeoutError):  # symbolic answers do go to the (idle, unstarted) pool
        asyncio.run(asyncio.wait_for(v.verify(symbolic), 0.5))
