"""Student tokens/s of our stack's on-policy run against TRL's ``DistillationTrainer``, by model width.

``benchmarks/compare.py`` measures speed at the demo's size (a 4-layer student of width 48), where
per-call costs dominate. This runs the same budget on randomly initialized models of the task's
tokenizer at several widths (4 layers; the teacher a third wider, as the demo's): the ``dense``
run of compare (reverse KL on the full vocabulary, no reward) through the real local stack
(embedded Redis, teacher and reward services, control plane, one learner, one rollout worker),
and TRL's trainer in this process, each timed as compare times it (our learner's clock from the
student loaded; TRL's ``trainer.train()`` less its evaluations). Random students answer with
random tokens, which costs what a trained student's answers cost: accuracy is not measured.

The last column bounds the ratio where model work is all the cost: the rows (token positions) of
a step's training forward pass, TRL's over ours (the teacher's pass and sampling compare alike).
Both pad a batch's prompts to its longest and its responses to ``max_new_tokens`` (random students
do not stop early); TRL runs a prompt once per response, we run it once per group of K
(``services.rollout.shared_prompt``), and not the last response token, which predicts nothing.

    .venv/bin/python -m benchmarks.bench_stack_vs_trl                  # widths 48 and 256, 150 steps
    .venv/bin/python -m benchmarks.bench_stack_vs_trl --widths 48,128,256,512 --steps 100
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

from benchmarks.compare import Budget, stack_specs, timed_run
from services.control import arithmetic_models as am
from services.control.arithmetic import read_dataset, write_dataset
from services.control.client import ApiClient
from services.control.demo import EVAL_LENGTHS, register_teacher, stack_config
from services.control.stack import LocalStack
from services.teacher.tiny_model import TinySpec, build_tiny_model


def models(root: Path, width: int) -> tuple[Path, Path]:
    """A random teacher (a third wider, heads of an even size) and student of ``width``."""
    teacher_width = width * 4 // 3 // 8 * 8
    dirs = []
    for role, w, seed in (("teacher", teacher_width, 1), ("student", width, 2)):
        spec = TinySpec(hidden_size=w, num_layers=4, num_heads=4, max_length=64, seed=seed, add_bos=True)
        dirs.append(build_tiny_model(root / f"{role}-{width}", spec, words=am.WORDS))
    return dirs[0], dirs[1]


def ours(work: Path, teacher: Path, student: Path, train: Path, b: Budget, port: int) -> tuple[float, int]:
    spec = stack_specs(student, train, b)["dense"]
    spec["checkpoint_interval"] = b.steps  # one checkpoint: this measures speed, not a curve
    cfg = stack_config(work, teacher, port)
    with LocalStack(cfg) as stack, ApiClient(stack.api_url, cfg.token) as client:
        register_teacher(stack, client)
        _, wall, tokens = timed_run(stack, "dense", spec, lambda line: None)
    return wall, tokens


def trl(work: Path, teacher: Path, student: Path, train: Path, b: Budget) -> tuple[float, int]:
    from benchmarks.trl_baseline import run_trl

    out = run_trl(teacher, student, train, work, steps=b.steps, prompts_per_step=b.prompts_per_step,
                  responses_per_prompt=b.responses_per_prompt, max_new_tokens=b.max_new_tokens, lr=b.lr,
                  lr_schedule=b.lr_schedule, eval_every=b.steps, eval_lengths=EVAL_LENGTHS[:1],
                  seed=b.seed, eval_count=1, final_count=1, kl_count=1)  # fmt: skip
    return float(out["wall_s"]), int(out["student_tokens"])


def work_ratio(prompt_tokens: int, b: Budget) -> float:
    """TRL's rows of a training forward pass over ours, per prompt of ``prompt_tokens`` and its K
    responses of ``max_new_tokens``."""
    k, t = b.responses_per_prompt, b.max_new_tokens
    return k * (prompt_tokens + t) / (prompt_tokens + k * (t - 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="48,256", help="comma-separated student hidden sizes")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--port", type=int, default=8300, help="the stack's control plane")
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    if any(w < 8 or w % 8 for w in widths):
        p.error(f"--widths: multiples of 8 (4 heads of an even size), got {a.widths}")
    if importlib.util.find_spec("trl") is None:
        p.error("TRL 1.16.0 is a benchmark tool `make demo` does not install: run `make .venv/.installed`")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    b = Budget(steps=a.steps)
    print(f"{b.steps} steps of {b.prompts_per_step} prompts x {b.responses_per_prompt} responses of at most "
          f"{b.max_new_tokens} tokens; {os.cpu_count()} CPUs")  # fmt: skip
    print("| student width | ours ms/step | TRL ms/step | ours tokens/s | TRL tokens/s | ours / TRL "
          "| work ratio |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_dataset(root / "train.jsonl", range(1, 9), "train", per_length=500, seed=0)
        longest = max(len(am.encode_prompt(row["prompt"])) for row in read_dataset(train))
        bound = f"{work_ratio(longest, b):.2f}x"  # the prompts of this dataset are all of one length
        for width in widths:
            teacher, student = models(root, width)
            our_wall, our_tokens = ours(root / f"stack-{width}", teacher, student, train, b, a.port)
            trl_wall, trl_tokens = trl(root / f"trl-{width}", teacher, student, train, b)
            our_speed, trl_speed = our_tokens / our_wall, trl_tokens / trl_wall
            ms = f"{1000 * our_wall / b.steps:.0f} | {1000 * trl_wall / b.steps:.0f}"
            speeds = f"{our_speed:.0f} | {trl_speed:.0f} | {our_speed / trl_speed:.2f}x"
            print(f"| {width} | {ms} | {speeds} | {bound} |", flush=True)


if __name__ == "__main__":
    main()
