"""The demo's teacher and student for :mod:`services.control.arithmetic`, built offline on a CPU.

``python -m services.control.arithmetic_models teacher DIR`` trains a small Llama from scratch
on the addition task (ground-truth answers) until it reaches ``--target`` held-out exact match
or its time budget runs out; ``student DIR`` builds a narrower model and warms it up on the same
data (GKD's warm-up, seed 002 chapter 4) until ``--target`` (20%), so its samples are not
garbage but far below the teacher; ``eval DIR`` prints held-out exact match per answer length as JSON. Each
runs in a child process: the control plane never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.control.arithmetic import MAX_DIGITS, SPECIALS, WORDS, digit_errors, problems
from services.teacher.tiny_model import TinySpec, build_tiny_model

EOS, PAD = SPECIALS.index("</s>"), SPECIALS.index("<pad>")
_ID = {w: len(SPECIALS) + i for i, w in enumerate(WORDS)}
TEACHER = TinySpec(hidden_size=96, num_layers=2, num_heads=4, max_length=64, seed=1)
STUDENT = TinySpec(hidden_size=48, num_layers=2, num_heads=4, max_length=64, seed=2)


@dataclass
class TrainConfig:
    lengths: tuple[int, ...]
    max_steps: int
    budget_s: float  # stop after this long even when max_steps is not reached
    target: float = 1.0  # stop once held-out exact match (checked every eval_every steps) reaches it
    batch: int = 128
    lr: float = 3e-3
    eval_every: int = 250
    seed: int = 0


def encode(text: str) -> list[int]:
    return [_ID[w] for w in text.split()]


def _batch(n: int, size: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` train problems of ``n`` digits as (input_ids, labels); the loss is on the answer."""
    rows = list(problems(n, "train", size, seed=rng.randrange(2**31)))
    prompt_len = len(encode(rows[0].prompt))
    ids = torch.tensor([encode(p.prompt) + encode(p.answer) + [EOS] for p in rows])
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 0 at ``total``."""
    return min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def train(model: PreTrainedModel, cfg: TrainConfig, log_prefix: str) -> float:
    """Supervised training on ground-truth answers; returns the last held-out exact match."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.max_steps))
    start, accuracy = time.monotonic(), 0.0
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids, labels = _batch(rng.choice(cfg.lengths), cfg.batch, rng)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step == cfg.max_steps or time.monotonic() - start > cfg.budget_s
        if step % cfg.eval_every == 0 or done:
            per_length = evaluate(model, cfg.lengths, count=100)
            accuracy = sum(per_length.values()) / len(per_length)
            elapsed = time.monotonic() - start
            print(f"{log_prefix} step {step}  loss {loss.item():.3f}  held-out exact match "
                  f"{accuracy:.3f}  ({elapsed:.0f} s)", flush=True)  # fmt: skip
            if accuracy >= cfg.target or done:
                break
    return accuracy


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, prompts: Sequence[str], digits: int) -> list[str]:
    """Greedy answers to same-length prompts, as text (the tokens before ``</s>``)."""
    model.eval()
    ids = torch.tensor([encode(p) for p in prompts])
    out = model.generate(  # type: ignore[operator]
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=digits + 2, pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    words = {i: w for w, i in _ID.items()}
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        answers.append(" ".join(words.get(t, "?") for t in row))
    return answers


def grade(
    model: PreTrainedModel, lengths: Sequence[int], count: int = 200, seed: int = 0
) -> tuple[dict[int, float], dict[int, float]]:
    """Held-out exact match and mean :func:`~services.control.arithmetic.digit_errors` per answer
    length (operand digits), from one greedy pass. The wrong digits are the "total error" that
    seed 002 (chapter 2) bounds by ε·T² for off-policy training and by ε·T on-policy; exact match
    only asks whether it is zero."""
    exact, wrong = {}, {}
    for n in lengths:
        rows = list(problems(n, "test", count, seed))
        got = greedy_answers(model, [p.prompt for p in rows], n)
        exact[n] = sum(g == p.answer for g, p in zip(got, rows, strict=True)) / len(rows)
        wrong[n] = sum(digit_errors(g, p.answer) for g, p in zip(got, rows, strict=True)) / len(rows)
    return exact, wrong


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
        ids = torch.tensor([encode(p.prompt) for p in problems(n, "test", count, seed)])
        out = student.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
            max_new_tokens=n + 2, pad_token_id=PAD, eos_token_id=EOS,
        )  # fmt: skip
        seq, start = out, ids.shape[1]
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


def build(out_dir: Path, spec: TinySpec, cfg: TrainConfig, role: str) -> float:
    """Build, train and save a model; the directory gets its ``config.json`` only when done."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    build_tiny_model(tmp, spec, words=WORDS)
    model = load(tmp)
    accuracy = train(model, cfg, role)
    model.save_pretrained(tmp)
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
    p.add_argument("--budget-s", type=float, default=240.0)
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
        cfg = TrainConfig(lengths, a.steps or 4000, a.budget_s, a.target or 0.97)
        build(a.dir, TEACHER, cfg, "teacher")
    else:
        # the same recipe, stopped early: samples that are not garbage, far below the teacher
        target = a.target or 0.2
        cfg = TrainConfig(lengths, a.steps or 4000, a.budget_s, target, eval_every=100, seed=2)
        build(a.dir, STUDENT, cfg, "student")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
