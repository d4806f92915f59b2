"""The demo's addition task: format, splits, dataset files, and the exact-answer verifier on the
text a rollout worker decodes from the student's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.control.arithmetic import (
    ERASE,
    MAX_DIGITS,
    Problem,
    answer_of,
    digit_errors,
    is_test,
    problems,
    read_dataset,
    with_correction,
    write_dataset,
)
from services.reward.verifiers.builtin import exact_match


def test_digits_are_written_least_significant_first_and_padded() -> None:
    p = Problem(345, 129, 3)
    assert p.prompt == "5 4 3 _ _ _ _ _ + 9 2 1 _ _ _ _ _ ="
    assert p.answer == "4 7 4 0"  # 474, one digit longer than the operands: the carry digit stays
    assert Problem(999, 1, 3).answer == "0 0 0 1"
    assert len(Problem(12345678, 87654321, MAX_DIGITS).prompt.split()) == 2 * MAX_DIGITS + 2


@pytest.mark.parametrize("digits", [1, 2, 4, 8])
def test_splits_are_disjoint_deterministic_and_of_the_asked_length(digits: int) -> None:
    train = list(problems(digits, "train", 300, seed=0))
    test = list(problems(digits, "test", 300, seed=0))
    assert {(p.a, p.b) for p in train}.isdisjoint({(p.a, p.b) for p in test})
    assert all(not is_test(p.a, p.b, digits) for p in train) and all(is_test(p.a, p.b, digits) for p in test)
    assert len({(p.a, p.b) for p in train}) == len(train)
    assert all(len(p.answer.split()) == digits + 1 for p in train + test)
    assert all(len(str(p.a)) == digits for p in train if digits > 1)
    assert train == list(problems(digits, "train", 300, seed=0))
    assert train != list(problems(digits, "train", 300, seed=1)) or digits == 1


def test_a_small_space_is_enumerated_without_running_dry() -> None:
    test = list(problems(1, "test", 1000, seed=0))
    assert 0 < len(test) < 100 and len(test) == sum(is_test(a, b, 1) for a in range(10) for b in range(10))


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        next(problems(2, "validation", 1, seed=0))


def test_dataset_file_feeds_the_exact_match_verifier(tmp_path: Path) -> None:
    rows = read_dataset(write_dataset(tmp_path / "d.jsonl", [2, 5], "test", per_length=3, seed=0))
    assert sorted(r["digits"] for r in rows) == [2, 2, 2, 5, 5, 5]
    mixed = read_dataset(write_dataset(tmp_path / "m.jsonl", range(1, 9), "train", per_length=50, seed=0))
    assert {r["digits"] for r in mixed[:40]} == set(range(1, 9))  # lengths mixed, not in blocks
    row = rows[0]
    reference = {"answer": row["answer"]}

    def score(response: str) -> float:  # the demo's verifier: exact_match, no extraction, "<" erases
        out = exact_match(row["prompt"], response, reference, extract="none", erase=ERASE)
        return out.values["exact_match"]

    wrong_last = row["answer"][:-1] + ("1" if row["answer"][-1] != "1" else "2")
    assert score(row["answer"]) == 1.0 and score(" " + row["answer"] + " ") == 1.0
    assert score(wrong_last) == 0.0
    assert score(row["answer"] + " 0") == 0.0
    assert score(wrong_last + " < " + row["answer"][-1]) == 1.0  # a mistake taken back
    first_wrong = "9" if row["answer"][0] != "9" else "8"
    assert score(with_correction(row["answer"], 0, first_wrong)) == 1.0
    assert score(row["answer"] + " <") == 0.0  # the last digit erased


@pytest.mark.parametrize(
    ("response", "answer"),
    [("4 7 4 0", "4 7 4 0"), ("4 9 < 7 4 0", "4 7 4 0"), ("4 7 4 0 1 <", "4 7 4 0"),
     ("< 4 7", "4 7"), ("4 < < 7", "7"), ("1 2 < < < 3", "3"), ("", "")],
)  # fmt: skip
def test_erasures_take_back_the_word_before(response: str, answer: str) -> None:
    assert answer_of(response) == answer


def test_a_correction_shows_one_wrong_digit_erased() -> None:
    assert with_correction("4 7 4 0", 1, "9") == "4 9 < 7 4 0"
    assert answer_of(with_correction("4 7 4 0", 3, "5")) == "4 7 4 0"
    for position, wrong in ((4, "1"), (1, "7"), (0, "x")):
        with pytest.raises(ValueError, match="position"):
            with_correction("4 7 4 0", position, wrong)


def test_tokens_decode_to_the_answer_text(tmp_path: Path) -> None:
    """The rollout worker encodes a prompt as the models were trained on it (<s> first) and decodes
    with skip_special_tokens; the verifier must see "d d d"."""
    from transformers import AutoTokenizer

    from services.control.arithmetic import WORDS
    from services.control.arithmetic_models import BOS, EOS, encode, encode_prompt
    from services.teacher.tiny_model import TinySpec, build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m", TinySpec(hidden_size=8, add_bos=True), words=WORDS)
    tok = AutoTokenizer.from_pretrained(model_dir)
    p = Problem(57, 68, 2)
    assert tok.encode(p.prompt) == encode_prompt(p.prompt) == [BOS, *encode(p.prompt)]
    assert tok.decode([*encode(p.answer), EOS], skip_special_tokens=True) == p.answer


@pytest.mark.parametrize(
    ("got", "errors"),
    [("4 7 4 0", 0), ("4 7 5 0", 1), ("5 7 4 1", 2), ("4 7 4", 1), ("4 7 4 0 0", 1), ("", 4), ("7 4 0", 4)],
)
def test_digit_errors_count_wrong_missing_and_extra_positions(got: str, errors: int) -> None:
    # positions are compared in place: a dropped digit shifts, so every later one is wrong too
    assert digit_errors(got, "4 7 4 0") == errors
