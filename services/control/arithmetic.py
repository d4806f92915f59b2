"""The demo's verifiable task: multi-digit addition written digit by digit.

``n``-digit operands give an answer of ``n + 1`` digits (a leading 0 is kept, so the length
says the difficulty). Numbers are written least-significant digit first, e.g. 345 + 129 is
the prompt ``5 4 3 _ _ _ _ _ + 9 2 1 _ _ _ _ _ =`` with the answer ``4 7 4 0``: a carry
then flows the way the model writes, and the padding to ``MAX_DIGITS`` puts every digit at a
fixed distance from the answer digit it feeds; both let a small transformer learn the task
in minutes on a CPU.

A model may take a digit back: the word ``<`` erases the word before it, and the answer is
graded after its erasures (``answer_of``), e.g. ``4 9 < 7 4 0`` answers ``4 7 4 0``. Without it
a wrong digit ruins the answer whatever comes next, and learning at the states a mistake leads
to, which is what on-policy training adds (DAgger, seed 002 chapter 2), could not pay off. The
demo's teacher is trained to repair mistakes (``with_correction``); only a student that learns
on its own samples meets its own mistakes, and the teacher's repairs of them, while training.

Problems are split by a hash of the operands, so the held-out set never appears in training
at any length. Pure Python: the control plane imports this without torch.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from services.reward.verifiers.builtin import apply_erasures

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
ERASE = "<"  # erases the word before it: a model can take back a digit
WORDS = (*"0123456789", "+", "=", "_", ERASE)
VOCAB = len(SPECIALS) + len(WORDS)  # 18
MAX_DIGITS = 8  # operands are padded with "_" to this width, so every digit has a fixed position
TEST_SHARE = 10  # one problem in TEST_SHARE is held out


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    digits: int

    @property
    def prompt(self) -> str:
        pad = " _" * (MAX_DIGITS - self.digits)
        return f"{_digits(self.a, self.digits)}{pad} + {_digits(self.b, self.digits)}{pad} ="

    @property
    def answer(self) -> str:
        return _digits(self.a + self.b, self.digits + 1)


def _digits(x: int, width: int) -> str:
    """``x`` as ``width`` space-separated digits, least significant first."""
    return " ".join(reversed(str(x).zfill(width)))


def answer_of(response: str) -> str:
    """What a response answers once its erasures are applied; graded as the demo's exact-answer
    verifier grades it (the reward service's ``exact_match`` with ``erase: "<"``)."""
    return apply_erasures(response, ERASE)


def answer_room(digits: int) -> int:
    """Tokens a response to ``digits``-digit operands may take: the answer's digits and </s>, and
    room for one correction (a wrong digit and ``<``)."""
    return digits + 4


def with_correction(answer: str, position: int, wrong: str) -> str:
    """``answer`` with the digit ``wrong`` written at ``position``, erased, then the right digit."""
    words = answer.split()
    if not 0 <= position < len(words) or wrong == words[position] or not wrong.isdigit():
        raise ValueError(f"position, wrong: {position}, {wrong!r} is not a wrong digit of {answer!r}")
    return " ".join([*words[:position], wrong, ERASE, *words[position:]])


def digit_errors(got: str, answer: str) -> int:
    """Positions where answer text ``got`` differs from ``answer``; a missing or extra token counts."""
    return sum(g != a for g, a in zip_longest(got.split(), answer.split()))


def is_test(a: int, b: int, digits: int) -> bool:
    h = hashlib.blake2b(f"{digits}:{a}:{b}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % TEST_SHARE == 0


def problems(digits: int, split: str, count: int, seed: int) -> Iterator[Problem]:
    """``count`` distinct problems of ``digits``-digit operands from ``split`` (train or test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}:{digits}:{split}")
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    if (high - low + 1) ** 2 <= 100 * count:  # small space: enumerate, so a split cannot run dry
        pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
        rng.shuffle(pairs)
        chosen = [p for p in pairs if is_test(*p, digits) == (split == "test")][:count]
        yield from (Problem(a, b, digits) for a, b in chosen)
        return
    seen: set[tuple[int, int]] = set()
    while len(seen) < count:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) not in seen and is_test(a, b, digits) == (split == "test"):
            seen.add((a, b))
            yield Problem(a, b, digits)


def write_dataset(path: Path, lengths: Sequence[int], split: str, per_length: int, seed: int) -> Path:
    """A run-spec dataset: one ``{"prompt", "answer", "digits"}`` line per problem, lengths mixed
    in a seeded random order (workers take prompts in file order)."""
    rows = [{"prompt": p.prompt, "answer": p.answer, "digits": n}
            for n in lengths for p in problems(n, split, per_length, seed)]  # fmt: skip
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_dataset(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
