"""The demo's model recipes (services/control/arithmetic_models.py): training batches with
corrected mistakes, forced mistakes for the repair rate, and the recipe cache."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.control import arithmetic_models as am
from services.control.arithmetic import ERASE, MAX_DIGITS, answer_of
from services.teacher.tiny_model import TinySpec, build_tiny_model

WORD = {i: w for w, i in am._ID.items()}
PROMPT = 2 * MAX_DIGITS + 3  # tokens of every prompt: <s>, two padded operands, "+" and "="


def _answers(ids: torch.Tensor, labels: torch.Tensor) -> list[tuple[str, str]]:
    """Each row's answer text (between the prompt and </s>) and the text of its labelled tokens."""
    out = []
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        assert row[0] == am.BOS and all(x == -100 for x in lab[:PROMPT])
        answer = " ".join(WORD[t] for t in row[PROMPT : row.index(am.EOS)])
        out.append((answer, " ".join(WORD.get(t, "</s>") for t in lab[PROMPT:] if t != -100)))
    return out


def test_corrected_rows_show_a_mistake_without_teaching_it() -> None:
    ids, labels = am._batch((1, 4, 8), 64, random.Random(0), corrected=1.0)
    lengths = set()
    for answer, taught in _answers(ids, labels):
        words = answer.split()
        assert words.count(ERASE) == 1
        wrong = words.index(ERASE) - 1
        # the wrong digit is the only unlabelled token of the answer; </s> is labelled
        assert taught.split() == [*words[:wrong], *words[wrong + 1 :], "</s>"]
        lengths.add(len(answer_of(answer).split()))
    assert lengths == {2, 5, 9}  # every length of the batch's choice, in one batch


def test_near_miss_mistakes_are_one_off_the_right_digit() -> None:
    ids, labels = am._batch((8,), 64, random.Random(2), corrected=1.0, near_miss=1.0)
    offsets = set()
    for answer, _ in _answers(ids, labels):
        words = answer.split()
        wrong = words.index(ERASE) - 1
        offsets.add((int(words[wrong]) - int(words[wrong + 2])) % 10)  # the wrong digit, "<", the right one
    assert offsets == {1, 9}  # one above and one below (mod 10), nothing further off


def test_clean_rows_teach_the_whole_answer() -> None:
    ids, labels = am._batch((3,), 16, random.Random(1), corrected=0.0)
    for answer, taught in _answers(ids, labels):
        assert ERASE not in answer and taught == answer + " </s>" and len(answer.split()) == 4


def test_forced_mistakes_end_in_a_wrong_digit() -> None:
    forced = am.forced_mistakes(6, 50, seed=3)
    assert len(forced) == 50 and forced == am.forced_mistakes(6, 50, seed=3)
    for problem, start in forced:
        words, right = start.split(), problem.answer.split()
        assert words[:-1] == right[: len(words) - 1] and words[-1] != right[len(words) - 1]
    assert len({len(s.split()) for _, s in forced}) > 3  # the mistake falls at many positions


@pytest.fixture
def tiny() -> tuple[TinySpec, am.TrainConfig]:
    spec = TinySpec(hidden_size=8, num_layers=1, num_heads=2, max_length=64)
    return spec, am.TrainConfig(lengths=(1,), max_steps=2, batch=4, eval_every=1)


def test_a_model_is_rebuilt_only_when_its_recipe_changes(
    tiny: tuple[TinySpec, am.TrainConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, cfg = tiny
    out = tmp_path / "teacher"
    assert am.build(out, spec, cfg, "teacher") is not None
    weights = (out / "model.safetensors").read_bytes()
    assert am.build(out, spec, cfg, "teacher") is None
    assert "using the cached teacher" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == weights
    assert am.build(out, spec, replace(cfg, corrected=0.5), "teacher") is not None  # another recipe
    assert not (tmp_path / "teacher.tmp").exists()


def test_repair_rate_is_a_share_of_the_forced_mistakes(tiny: tuple[TinySpec, am.TrainConfig],
                                                       tmp_path: Path) -> None:  # fmt: skip
    spec, cfg = tiny
    am.build(tmp_path / "m", spec, cfg, "teacher")
    model = am.load(tmp_path / "m")
    rate = am.repair_rate(model, digits=2, count=20)
    assert 0.0 <= rate <= 1.0 and rate == am.repair_rate(model, digits=2, count=20)


def _checked_steps(out: str) -> list[int]:
    return [int(line.split()[2]) for line in out.splitlines() if line.startswith("teacher step ")]


@pytest.mark.parametrize(
    ("target", "repair_target", "limit_s", "checked"),
    [(0.0, 0.0, None, [2]), (1.01, 0.0, None, [2, 4, 6]), (0.0, 1.01, None, [2, 4, 6]),
     (1.01, 0.0, 0.0, [1])],
)
def test_training_stops_once_both_targets_are_met_or_steps_or_time_run_out(
    tiny: tuple[TinySpec, am.TrainConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    target: float, repair_target: float, limit_s: float | None, checked: list[int],
) -> None:  # fmt: skip
    """Checked every eval_every steps and at the last: met targets stop it at the first check; an
    unreachable accuracy or repair target trains it to max_steps, unless its time limit is out first;
    then it stops at once and says why."""
    spec, cfg = tiny
    cfg = replace(cfg, max_steps=6, eval_every=2, target=target, repair_target=repair_target, limit_s=limit_s)
    build_tiny_model(tmp_path / "m", spec, words=am.WORDS)
    am.train(am.load(tmp_path / "m"), cfg, "teacher")
    out = capsys.readouterr().out
    assert _checked_steps(out) == checked
    assert ("repairs" in out) == (repair_target > 0)
    assert ("stopped by its 0 s limit below its targets" in out) == (limit_s == 0.0)
    assert ("stopped by its 6 steps below its targets" in out) == (checked == [2, 4, 6])


class _Scripted:
    """A model whose sampled responses are given, one per row of the batch it is asked for: the
    generation itself is transformers' (tested there); what is tested here is the grading."""

    def __init__(self, responses: list[str]) -> None:
        self.responses = responses

    def eval(self) -> _Scripted:
        return self

    def generate(self, input_ids: torch.Tensor, **kw: object) -> torch.Tensor:
        assert kw["do_sample"] is True and kw["top_k"] == 0 and len(self.responses) == len(input_ids)
        room = int(kw["max_new_tokens"])  # type: ignore[call-overload]
        rows = [(am.encode(r) + [am.EOS] + [am.PAD] * room)[:room] for r in self.responses]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_sampled_exact_match_grades_every_sample_after_its_erasures() -> None:
    """Each problem's samples are graded against that problem's answer, a repaired answer counts, and
    the share is over all samples."""
    first, second = (p.answer for p in am.problems(2, "test", 2, seed=0))
    wrong = str((int(first.split()[0]) + 1) % 10)
    responses = [first, f"{wrong} {ERASE} {first}", second, first]  # samples 0-1 of problem 0, 2-3 of 1
    got = am.sampled_exact_match(_Scripted(responses), [2], count=2, samples=2)  # type: ignore[arg-type]
    assert got == {2: 0.75}
