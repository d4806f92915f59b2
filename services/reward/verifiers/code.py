"""The ``code`` verifier: run the response's Python program against the reference's tests.

Reference fields: ``tests`` — JSON list of ``{"input": stdin, "output": expected stdout}``
(reward = fraction of cases whose stdout matches, trailing whitespace ignored) — or
``test_code`` — Python asserts run after the program (reward 1.0 if they pass, else 0.0).
The program runs in the sandbox; limits hit are reported as TIMEOUT (time) or ERROR (memory,
processes, output), never as a score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.reward.domain import Item, Outcome, VerifierInfo
from services.reward.errors import VerifierFailure, VerifierTimeout
from services.reward.sandbox import Sandbox, SandboxOutcome
from services.reward.verifiers.base import Verifier

HARNESS = Path(__file__).resolve().parent.parent / "harness.py"
FENCE = re.compile(r"```[ \t]*(\w*)[^\n]*\n(.*?)```", re.DOTALL)
SIGXCPU_EXIT = 128 + 24


def extract_program(response: str) -> str | None:
    """The last fenced block tagged python/py (else the last fenced block); None if none."""
    blocks = FENCE.findall(response)
    tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    chosen = tagged or [body for _, body in blocks]
    return chosen[-1] if chosen else None


def parse_tests(text: str) -> list[dict[str, str]]:
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as err:
        raise VerifierFailure(f"reference field 'tests' is not JSON: {err}") from err
    ok = (
        isinstance(tests, list)
        and tests
        and all(
            isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)
            for t in tests
        )
    )
    if not ok:
        raise VerifierFailure("reference field 'tests' must be a non-empty list of {input, output} strings")
    return list(tests)


def _same_output(got: str, want: str) -> bool:
    return [ln.rstrip() for ln in got.rstrip().splitlines()] == [
        ln.rstrip() for ln in want.rstrip().splitlines()
    ]


class CodeVerifier(Verifier):
    def __init__(self, info: VerifierInfo, timeout_s: float, sandbox: Sandbox, case_timeout_s: float) -> None:
        super().__init__(info, timeout_s)
        self.sandbox, self.case_timeout_s = sandbox, case_timeout_s
        self._harness = HARNESS.read_text()

    def missing_fields(self, reference: Mapping[str, str]) -> list[str]:
        return [] if "tests" in reference or "test_code" in reference else ["tests (or test_code)"]

    async def verify(self, item: Item) -> Outcome:
        program = extract_program(item.response)
        if program is None:
            return Outcome({self.name: 0.0}, "no code block in the response")
        tests = parse_tests(item.reference["tests"]) if "tests" in item.reference else None
        job: dict[str, Any] = {"case_timeout_s": self.case_timeout_s}
        if tests is not None:
            job.update(mode="stdio", inputs=[t["input"] for t in tests])
        else:
            job.update(mode="assert", test_code=item.reference["test_code"])
        files = {"solution.py": program, "harness.py": self._harness}
        run = await self.sandbox.run(files, ["harness.py"], json.dumps(job))
        cases = _harness_cases(run)
        if tests is None:
            passed = cases[0]["ok"]
            return Outcome({self.name: float(passed)}, "tests passed" if passed else cases[0]["error"])
        good = sum(
            c["ok"] and _same_output(c["stdout"], t["output"]) for c, t in zip(cases, tests, strict=True)
        )
        return Outcome({self.name: good / len(tests)}, f"{good}/{len(tests)} tests passed")


def _harness_cases(run: SandboxOutcome) -> list[dict[str, Any]]:
    """The per-case results, or the limit the run hit as VerifierTimeout / VerifierFailure."""
    if run.timed_out or run.exit_code == SIGXCPU_EXIT:
        raise VerifierTimeout(f"program killed at its {'wall' if run.timed_out else 'CPU'}-time limit")
    if run.truncated:
        raise VerifierFailure("program output exceeded the sandbox output limit")
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.exit_code != 0 or len(lines) != 1:
        raise VerifierFailure(f"program died (exit code {run.exit_code}): {run.stderr[-200:].strip()}")
    cases: list[dict[str, Any]] = json.loads(lines[0][len("RESULT ") :])["cases"]
    for case in cases:
        if case.get("kind") == "timeout":
            raise VerifierTimeout(case["error"])
        if case.get("kind") in ("memory", "processes"):
            raise VerifierFailure(case["error"])
    return cases
