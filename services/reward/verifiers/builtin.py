"""Pure scoring functions of the built-in verifiers (picklable; they run in worker processes).

Each takes ``(prompt, response, reference, **options)`` and returns an ``Outcome``. They raise
``VerifierFailure`` for input they cannot judge (e.g. an invalid pattern in the reference).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from services.reward.domain import Outcome
from services.reward.errors import VerifierFailure

BOXED = "\\boxed{"
# Greedy and anchored, so linear in the response (a lazy group before "$" can go quadratic).
ANSWER_LINE = re.compile(r"(?im)\banswer[ \t]*(?:is|:)[ \t]*(.+)$")
_PUNCT = str.maketrans("", "", string.punctuation)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}``, balancing nested braces; None if there is none."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str, how: str) -> str | None:
    """The final answer of ``text``: ``boxed``, ``answer_line`` ("Answer: x"), ``auto`` (either), ``none``."""
    if how == "none":
        return text
    if how in ("boxed", "auto") and (boxed := last_boxed(text)) is not None:
        return boxed
    if how in ("answer_line", "auto") and (lines := ANSWER_LINE.findall(text)):
        return str(lines[-1]).rstrip(" \t.")
    return None


def normalize(text: str, case_sensitive: bool, strip_punctuation: bool, collapse_whitespace: bool) -> str:
    text = text.strip()
    if not case_sensitive:
        text = text.casefold()
    if strip_punctuation:
        text = text.translate(_PUNCT)
    if collapse_whitespace:
        text = " ".join(text.split())
    return text


def apply_erasures(text: str, erase: str) -> str:
    """``text`` after every word ``erase`` has deleted itself and the word before it (a model's
    self-correction, e.g. ``"4 9 < 7"`` → ``"4 7"``); words are whitespace-separated."""
    words: list[str] = []
    for word in text.split():
        if word != erase:
            words.append(word)
        elif words:
            words.pop()
    return " ".join(words)


def exact_match(
    prompt: str,
    response: str,
    reference: Mapping[str, str],
    *,
    field: str = "answer",
    extract: str = "auto",
    erase: str = "",
    case_sensitive: bool = False,
    strip_punctuation: bool = False,
    collapse_whitespace: bool = True,
) -> Outcome:
    """1.0 when the normalized final answer equals the normalized ``reference[field]``; with
    ``erase`` (a word, e.g. ``"<"``) its erasures are applied to the answer first."""
    got = final_answer(response, extract)
    if got is None:
        return Outcome({"exact_match": 0.0}, f"no final answer found ({extract})")
    if erase:
        got = apply_erasures(got, erase)
    opts = (case_sensitive, strip_punctuation, collapse_whitespace)
    same = normalize(got, *opts) == normalize(reference[field], *opts)
    return Outcome({"exact_match": float(same)}, "match" if same else "no match")


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str) -> Any:
    # References repeat across the K samples of a prompt; parsing is the expensive half.
    from math_verify import parse

    return parse(text if "$" in text or BOXED in text else f"${text}$")


_PLAIN_NUMBER = re.compile(
    r"(?P<sign>-?)\s*(?:(?P<dec>\d+(?:\.\d+)?)|\\[dt]?frac\{(?P<fn>\d+)\}\{(?P<fd>\d+)\}|(?P<sn>\d+)\s*/\s*(?P<sd>\d+))"
)
_WRAPPERS = str.maketrans("", "", "$")
MAX_PLAIN_CHARS = 64


def plain_number(text: str) -> Fraction | None:
    """Exact value of a plain integer, decimal or fraction (``\\frac{a}{b}``, ``a/b``); else None."""
    if len(text) > MAX_PLAIN_CHARS:
        return None  # huge literals go to math-verify, in a worker, under a deadline
    m = _PLAIN_NUMBER.fullmatch(text.translate(_WRAPPERS).strip().rstrip("."))
    if m is None:
        return None
    if m["dec"] is not None:
        value = Fraction(m["dec"])
    else:
        num, den = (m["fn"], m["fd"]) if m["fn"] is not None else (m["sn"], m["sd"])
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
    return -value if m["sign"] else value


def _plain_verdict(gold: str, answer: str) -> bool | None:
    """Equality of two plain numbers when it is clear-cut, else None (math-verify decides).

    Exactly equal: True. Apart by more than math-verify's rounding could hide (its
    float_rounding is 6 digits): False. A near miss such as 0.333333 vs 1/3 is left to it.
    """
    a, b = plain_number(gold), plain_number(answer)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if abs(a - b) > Fraction(1, 10_000) * max(Fraction(1), abs(a), abs(b)):
        return False
    return None


def math_quick(
    prompt: str, response: str, reference: Mapping[str, str], *, field: str = "answer"
) -> Outcome | None:
    """The ``math`` verdict when it needs no LaTeX parsing (no final answer, or plain numbers), else None.

    Linear in the response and bounded in number size, so it runs on the event loop and most
    graded answers never pay a worker round trip.
    """
    answer = final_answer(response, "auto")
    if answer is None:
        return Outcome({"math": 0.0}, "no final answer (\\boxed{} or 'answer:') found")
    quick = _plain_verdict(reference[field], answer)
    if quick is None:
        return None
    return Outcome({"math": float(quick)}, "equivalent" if quick else "not equivalent")


def math_equiv(prompt: str, response: str, reference: Mapping[str, str], *, field: str = "answer") -> Outcome:
    """1.0 when the final answer is mathematically equal to ``reference[field]`` (math-verify).

    Plain numbers on both sides (most graded answers) are compared exactly without parsing
    LaTeX, which costs milliseconds per expression; everything else goes to math-verify.
    """
    from math_verify import parse, verify

    quick = math_quick(prompt, response, reference, field=field)
    if quick is not None:
        return quick
    answer = final_answer(response, "auto")
    assert answer is not None  # math_quick answered when there is none
    gold = _parse_gold(reference[field])
    if not gold:
        raise VerifierFailure(f"reference field '{field}' is not a parsable math answer")
    target = parse(f"${answer}$")
    if not target:
        return Outcome({"math": 0.0}, "final answer not parsable")
    same = bool(verify(gold, target))
    return Outcome({"math": float(same)}, "equivalent" if same else "not equivalent")


def regex_match(
    prompt: str,
    response: str,
    reference: Mapping[str, str],
    *,
    field: str = "pattern",
    mode: str = "search",
    ignore_case: bool = False,
) -> Outcome:
    """1.0 when ``reference[field]`` (a regex) matches the response (``search`` or ``fullmatch``)."""
    try:
        pattern = re.compile(reference[field], re.IGNORECASE if ignore_case else 0)
    except re.error as err:
        raise VerifierFailure(f"reference field '{field}' is not a valid regex: {err}") from err
    found = (
        pattern.fullmatch(response.strip()) if mode == "fullmatch" else pattern.search(response)
    ) is not None
    return Outcome({"regex": float(found)}, "matched" if found else "no match")


def length_penalty(
    prompt: str,
    response: str,
    reference: Mapping[str, str],
    *,
    unit: str = "words",
    max_length: int = 512,
    field: str = "max_length",
) -> Outcome:
    """0 up to the limit, then −(excess / limit), floored at −1. ``reference[field]`` overrides the limit."""
    limit_text = reference.get(field)
    try:
        limit = int(limit_text) if limit_text is not None else max_length
    except ValueError as err:
        raise VerifierFailure(f"reference field '{field}' is not an integer: {limit_text!r}") from err
    if limit <= 0:
        raise VerifierFailure(f"length limit must be positive, got {limit}")
    size = len(response.split()) if unit == "words" else len(response)
    value = 0.0 - min(1.0, max(0, size - limit) / limit)  # 0.0 - x: no "-0.0" within the limit
    return Outcome({"length_penalty": value}, f"{size} {unit} (limit {limit})")


def format_check(
    prompt: str,
    response: str,
    reference: Mapping[str, str],
    *,
    pattern: str = r"(?s).*(\\boxed\{.+\}|answer\s*:.+)",
    ignore_case: bool = True,
) -> Outcome:
    """1.0 when the whole response matches the configured format ``pattern`` (a server-side regex)."""
    ok = re.fullmatch(pattern, response.strip(), re.IGNORECASE if ignore_case else 0) is not None
    return Outcome({"format": float(ok)}, "well formed" if ok else "format not matched")
