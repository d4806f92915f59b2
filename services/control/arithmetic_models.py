"""The demo's teacher and student for :mod:`services.control.arithmetic`, built offline on a CPU.

``python -m services.control.arithmetic_models teacher DIR`` trains a small Llama from scratch
on the addition task until it reaches ``--target`` held-out exact match and repairs 95% of forced
mistakes, or ``--steps`` or ``--limit-s`` (if given) run out. Half of its answers carry one wrong
digit, erased and corrected (``arithmetic.with_correction``), with no loss on the wrong digit: it
learns to repair a mistake, never to make one. Half of those wrong digits are one off the right
one, the mistakes students make most. ``student DIR`` builds a narrower model and warms it up on
clean answers (GKD's warm-up, seed 002 chapter 4) until ``--target`` (20%), so its samples are
not garbage but far below the teacher; ``eval DIR`` prints held-out exact match per answer length
as JSON. Each runs in a child process: the control plane never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.control.arithmetic import (
    MAX_DIGITS,
    SPECIALS,
    WORDS,
    Problem,
    answer_of,
    answer_room,
    digit_errors,
    problems,
    with_correction,
)
from services.teacher.tiny_model import TinySpec, build_tiny_model

BOS, EOS, PAD = SPECIALS.index("<s>"), SPECIALS.index("</s>"), SPECIALS.index("<pad>")
_ID = {w: len(SPECIALS) + i for i, w in enumerate(WORDS)}
# Four layers: telling that the digit just written is wrong takes the teacher one more step of
# reasoning than writing the next digit (two or three layers learn the sum, but not to repair it).
# <s> before every prompt, as Llama's tokenizer adds it: without it, 2 of 4 student seeds warmed up
# on an AVX2 CPU (the demo's among them; 0 of 4 with it) found the first answer digit only where "_"
# pads the operands. The demo's layer-0 heads at "=" rested on the pads; 8-digit prompts have none,
# and it wrote their first digit at chance, even after distillation.
TEACHER = TinySpec(hidden_size=64, num_layers=4, num_heads=4, max_length=64, seed=1, add_bos=True)
STUDENT = TinySpec(hidden_size=48, num_layers=4, num_heads=4, max_length=64, seed=2, add_bos=True)


@dataclass
class TrainConfig:
    lengths: tuple[int, ...]
    max_steps: int
    target: float = 1.0  # stop once held-out exact match (checked every eval_every steps) reaches it
    corrected: float = 0.0  # share of answers shown with one mistake erased and corrected
    near_miss: float = 0.0  # share of those mistakes that are one off the right digit
    repair_target: float = 0.0  # ... and, when > 0, once repair_rate reaches this too
    limit_s: float | None = None  # stop after this long, whatever the accuracy
    batch: int = 128
    lr: float = 3e-3
    eval_every: int = 250
    seed: int = 0


def encode(text: str) -> list[int]:
    return [_ID[w] for w in text.split()]


def encode_prompt(text: str) -> list[int]:
    """A prompt's ids as the models' tokenizer gives them: <s> first."""
    return [BOS, *encode(text)]


def _mistake(answer: str, rng: random.Random, near_miss: float = 0.0) -> tuple[int, str]:
    """A uniformly drawn position of ``answer`` and a digit that is wrong there: with probability
    ``near_miss`` one off the right one (mod 10), else any other digit."""
    words = answer.split()
    position = rng.randrange(len(words))
    if near_miss and rng.random() < near_miss:
        return position, str((int(words[position]) + rng.choice((-1, 1))) % 10)
    return position, rng.choice([d for d in "0123456789" if d != words[position]])


def _answer(
    answer: str, corrected: float, near_miss: float, rng: random.Random
) -> tuple[list[int], int | None]:
    """The answer's ids, with probability ``corrected`` one wrong digit, ``<`` and the right one;
    and the index of the wrong digit (no loss there: it shows a mistake, it does not teach one)."""
    if rng.random() >= corrected:
        return encode(answer), None
    position, wrong = _mistake(answer, rng, near_miss)
    return encode(with_correction(answer, position, wrong)), position


def _batch(
    lengths: Sequence[int], size: int, rng: random.Random, corrected: float, near_miss: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` train problems of lengths drawn from ``lengths`` as (input_ids, labels), right-padded;
    the loss is on the answer and its </s>. Every length in every batch: one length per batch made
    the teacher's training take several times as many steps, and more erratically."""
    counts = Counter(rng.choice(lengths) for _ in range(size))
    rows = [p for n, k in sorted(counts.items()) for p in problems(n, "train", k, seed=rng.randrange(2**31))]
    prompt_len = len(encode_prompt(rows[0].prompt))
    answers = [_answer(p.answer, corrected, near_miss, rng) for p in rows]
    width = prompt_len + max(len(a) for a, _ in answers) + 1
    ids = torch.full((size, width), PAD)
    labels = torch.full((size, width), -100)
    for row, (p, (answer, wrong)) in enumerate(zip(rows, answers, strict=True)):
        seq = encode_prompt(p.prompt) + answer + [EOS]
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, prompt_len : len(seq)] = ids[row, prompt_len : len(seq)]
        if wrong is not None:
            labels[row, prompt_len + wrong] = -100
    return ids, labels


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 0 at ``total``."""
    return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _targets(cfg: TrainConfig) -> str:
    repairs = f" and {cfg.repair_target:.0%} of mistakes repaired" if cfg.repair_target else ""
    return f"{cfg.target:.0%} held-out exact match{repairs}"


def train(model: PreTrainedModel, cfg: TrainConfig, log_prefix: str) -> float:
    """Supervised training on ground-truth answers until both targets are met, or ``max_steps`` or
    ``limit_s`` run out; returns the last held-out exact match."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.max_steps))
    start, accuracy = time.monotonic(), 0.0
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids, labels = _batch(cfg.lengths, cfg.batch, rng, cfg.corrected, cfg.near_miss)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        out_of_time = cfg.limit_s is not None and time.monotonic() - start > cfg.limit_s
        if step % cfg.eval_every and step < cfg.max_steps and not out_of_time:
            continue
        per_length = evaluate(model, cfg.lengths, count=100)
        accuracy = sum(per_length.values()) / len(per_length)
        repairs = repair_rate(model, max(cfg.lengths), count=100) if cfg.repair_target else None
        shown = f"  repairs {repairs:.2f}" if repairs is not None else ""
        print(f"{log_prefix} step {step}  loss {loss.item():.3f}  held-out exact match "
              f"{accuracy:.3f}{shown}  ({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
        if accuracy >= cfg.target and (repairs or 0.0) >= cfg.repair_target:
            break
        if step == cfg.max_steps or out_of_time:
            why = f"its {cfg.limit_s:g} s limit" if out_of_time else f"its {cfg.max_steps} steps"
            print(f"{log_prefix}: stopped by {why} below its targets ({_targets(cfg)}); give it more "
                  "time or steps (--limit-s, --steps)", flush=True)  # fmt: skip
            break
    return accuracy


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, prompts: Sequence[str], digits: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded), as text (the tokens before ``</s>``)."""
    model.eval()
    rows = [encode_prompt(p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    out = model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=(ids != PAD).long(), do_sample=False,
        max_new_tokens=answer_room(digits), pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    return _texts(out[:, width:])


def _texts(responses: torch.Tensor) -> list[str]:
    """Generated rows as text: the words before the first ``</s>``."""
    words = {i: w for w, i in _ID.items()}
    out = []
    for row in responses.tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        out.append(" ".join(words.get(t, "?") for t in row))
    return out


def forced_mistakes(digits: int, count: int, seed: int = 0) -> list[tuple[Problem, str]]:
    """Held-out problems, each with an answer so far that ends in a wrong digit: the right answer up
    to a random position, then another digit there."""
    rng = random.Random(seed)
    out = []
    for p in problems(digits, "test", count, seed):
        position, wrong = _mistake(p.answer, rng)
        out.append((p, " ".join([*p.answer.split()[:position], wrong])))
    return out


def repair_rate(model: PreTrainedModel, digits: int, count: int = 100, seed: int = 0) -> float:
    """Share of :func:`forced_mistakes` that ``model``'s greedy continuation repairs (answer right
    once erasures are applied): how well it labels the states a mistake leads to (seed 002 ch. 2)."""
    forced = forced_mistakes(digits, count, seed)
    got = greedy_answers(model, [f"{p.prompt} {start}" for p, start in forced], digits)
    right = [answer_of(f"{start} {g}") == p.answer for (p, start), g in zip(forced, got, strict=True)]
    return sum(right) / len(forced)


def grade(
    model: PreTrainedModel, lengths: Sequence[int], count: int = 200, seed: int = 0
) -> tuple[dict[int, float], dict[int, float]]:
    """Held-out exact match and mean :func:`~services.control.arithmetic.digit_errors` per answer
    length (operand digits), from one greedy pass, erasures applied. The wrong digits are the
    "total error" that seed 002 (chapter 2) bounds by ε·T² for off-policy training and by ε·T
    on-policy; exact match only asks whether it is zero."""
    exact, wrong = {}, {}
    for n in lengths:
        rows = list(problems(n, "test", count, seed))
        got = [answer_of(g) for g in greedy_answers(model, [p.prompt for p in rows], n)]
        exact[n] = sum(g == p.answer for g, p in zip(got, rows, strict=True)) / len(rows)
        wrong[n] = sum(digit_errors(g, p.answer) for g, p in zip(got, rows, strict=True)) / len(rows)
    return exact, wrong


def _sample(model: PreTrainedModel, ids: torch.Tensor, digits: int) -> torch.Tensor:
    """Temperature-1 continuations of equal-length prompts ``ids``, from the model's own
    distribution (no top-k or top-p), prompts included."""
    return model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
        max_new_tokens=answer_room(digits), pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip


@torch.no_grad()
def sampled_exact_match(
    model: PreTrainedModel, lengths: Sequence[int], count: int = 200, samples: int = 4, seed: int = 0
) -> dict[int, float]:
    """Held-out exact match of ``samples`` temperature-1 answers per problem, erasures applied: how
    often the policy itself, which on-policy methods sample and train, gets a problem right. Greedy
    decoding hides the mass a student leaves on wrong digits; sampled answers pay for it at every
    digit, the more the longer the answer."""
    model.eval()
    torch.manual_seed(seed)
    exact = {}
    for n in lengths:
        rows = list(problems(n, "test", count, seed))
        ids = torch.tensor([encode_prompt(p.prompt) for p in rows]).repeat_interleave(samples, 0)
        got = [answer_of(text) for text in _texts(_sample(model, ids, n)[:, ids.shape[1] :])]
        exact[n] = sum(g == rows[i // samples].answer for i, g in enumerate(got)) / len(got)
    return exact


def evaluate(
    model: PreTrainedModel, lengths: Sequence[int], count: int = 200, seed: int = 0
) -> dict[int, float]:
    """Held-out exact match per answer length (operand digits)."""
    return grade(model, lengths, count, seed)[0]


@torch.no_grad()
def kl_to_teacher(student: PreTrainedModel, teacher: PreTrainedModel, lengths: Sequence[int],
                  count: int = 100, seed: int = 0) -> float:  # fmt: skip
    """Mean per-token KL(student ‖ teacher) on the student's own samples of held-out prompts."""
    student.eval()
    teacher.eval()
    torch.manual_seed(seed)
    total, tokens = 0.0, 0
    for n in lengths:
        ids = torch.tensor([encode_prompt(p.prompt) for p in problems(n, "test", count, seed)])
        seq, start = _sample(student, ids, n), ids.shape[1]
        resp = seq[:, start:]
        # positions up to and including the first </s> count; later ones are padding
        after_eos = (resp == EOS).long().cumsum(1) - (resp == EOS).long()
        mask = after_eos == 0
        s_lp = torch.log_softmax(student(seq).logits[:, start - 1 : -1].float(), -1)
        t_lp = torch.log_softmax(teacher(seq).logits[:, start - 1 : -1].float(), -1)
        kl = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
        total += float(kl[mask].sum())
        tokens += int(mask.sum())
    return total / max(tokens, 1)


def load(model_dir: Path, weights: Path | None = None) -> PreTrainedModel:
    """The model at ``model_dir``, with the weights of a safetensors file (a checkpoint's) if given."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(safetensors.torch.load_file(weights))
    return model


def latest_weights(checkpoints: Path) -> Path:
    """The model weights of a run's latest complete learner checkpoint."""
    from learner.checkpoint import latest_checkpoint_dir

    latest = latest_checkpoint_dir(checkpoints)
    if latest is None:
        raise SystemExit(f"--checkpoints: no complete checkpoint under {checkpoints}")
    return latest / "model.safetensors"


def recipe(spec: TinySpec, cfg: TrainConfig) -> dict[str, object]:
    """What a model is built from: a cached model is used only while its recipe is the current one."""
    return {"words": list(WORDS), "spec": asdict(spec), "train": asdict(cfg)}


def build(out_dir: Path, spec: TinySpec, cfg: TrainConfig, role: str) -> float | None:
    """Build, train and save a model, or keep the one at ``out_dir`` when its recipe is the same
    (returns None then). The directory is replaced only when the new model is complete."""
    wanted = recipe(spec, cfg)
    saved = out_dir / "recipe.json"
    if saved.exists() and json.loads(saved.read_text()) == json.loads(json.dumps(wanted)):
        print(f"using the cached {role} in {out_dir}", flush=True)
        return None
    print(f"training the {role} to {_targets(cfg)} (cached for reruns) ...", flush=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    build_tiny_model(tmp, spec, words=WORDS)
    model = load(tmp)
    accuracy = train(model, cfg, role)
    model.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(wanted, indent=1))
    if out_dir.exists():  # a rebuild replaces the old model
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return accuracy


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["teacher", "student", "eval"])
    p.add_argument("dir", type=Path)
    p.add_argument("--lengths", type=int, nargs="+", default=list(range(1, MAX_DIGITS + 1)))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--limit-s", type=float, help="stop training by then, whatever the accuracy")
    p.add_argument("--target", type=float, help="stop at this held-out exact match (default 0.97 / 0.2)")
    p.add_argument("--count", type=int, default=200, help="eval: held-out problems per length")
    p.add_argument("--checkpoints", type=Path, help="eval: a run's checkpoint folder (latest is used)")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lengths = tuple(a.lengths)
    if a.role == "eval":
        weights = latest_weights(a.checkpoints) if a.checkpoints else None
        print(json.dumps(evaluate(load(a.dir, weights), lengths, a.count)))
    elif a.role == "teacher":
        # issue 8 asks for at least 95% of held-out problems right, and a check of 800 problems reading
        # 95.5% was 92.0-97.5% per length on the demo's larger table; 97% leaves that margin. Repairs
        # bind as well: on-policy students learn the teacher's distribution on their own mistakes, and
        # a teacher stopped at 97% with 33% repaired (a 2 GHz Zen 1, once past a time budget) was no
        # expert there; its off-policy students beat the on-policy ones (benchmarks/HISTORY.md). Half
        # the mistakes one off: students are wrong by one far more often than by more, and a teacher
        # shown uniform mistakes repaired 83% of those (99% of the others; 96% and 99.8% with
        # near_miss) and put 25% on "<" after a 7 where 8 + 9 + a carry makes 8, the students'
        # commonest mistake (86% with near_miss; 8-digit answers, Intel Xeon)
        cfg = TrainConfig(lengths, a.steps or 4000, a.target or 0.97, corrected=0.5, near_miss=0.5,
                          repair_target=0.95, limit_s=a.limit_s)
        build(a.dir, TEACHER, cfg, "teacher")
    else:
        # clean answers, stopped early: samples that are not garbage, far below the teacher. Checked
        # every 25 steps: held-out exact match can jump from 19% to 80% within 100 steps (seen on an
        # AVX2 machine, where the float rounding sends training down another path than on AVX-512)
        cfg = TrainConfig(lengths, a.steps or 4000, a.target or 0.2, eval_every=25, seed=2, limit_s=a.limit_s)
        build(a.dir, STUDENT, cfg, "student")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
