"""TRL's ``DistillationTrainer`` on the addition task: benchmarks/compare.py's outside baseline (issue 8).

Same teacher, same student initialization, same train prompts as our runs, on CPU: the student
samples its own answers at temperature 1 (TRL 1.16's ``DistillationTrainer`` is always on-policy;
there is no ``lmbda``), and the loss is the reverse KL(student ‖ teacher) over the full vocabulary
(``beta=1.0``; ``0.0`` would be forward KL). Each optimizer step draws ``prompts_per_step`` prompts
and samples ``responses_per_prompt`` answers to each, as our ``SamplingSpec`` does; AdamW at
``lr``, held or decayed to 0 as ``lr_schedule`` says (transformers' schedulers, which our
``OptimizerSpec.schedule`` follows), with TRL's default grad-norm clip of 1.0, also our default.

Prompts are plain text: the word-level tokenizer adds ``<s>`` and there is no chat template, so
TRL's ids are ``arithmetic_models.encode_prompt(prompt)``; :func:`run_trl` checks this for every
prompt before training. The answer is the continuation and ``</s>`` ends it.

Run: ``python -m benchmarks.trl_baseline --teacher DIR --student DIR --train JSONL --steps 100``
(prints the result as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedModel, TrainerCallback

from contracts.runspec import LR_SCHEDULES
from services.control.arithmetic import read_dataset
from services.control.arithmetic_models import (
    encode_prompt,
    evaluate,
    grade,
    kl_to_teacher,
    load,
    sampled_exact_match,
)

_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


class _Curve(TrainerCallback):
    """Held-out exact match every ``every`` optimizer steps (and at step 0), timed so it can be left out."""

    def __init__(self, every: int, lengths: Sequence[int], count: int) -> None:
        self.every, self.lengths, self.count = every, tuple(lengths), count
        self.points: list[tuple[int, float]] = []
        self.eval_s = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self._eval(0, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._eval(state.global_step, model)

    def _eval(self, step: int, model: PreTrainedModel) -> None:
        start = time.perf_counter()
        per_length = evaluate(model, self.lengths, count=self.count)
        model.train()  # evaluate() left it in eval mode; TRL reads model.training to pick train/eval
        self.points.append((step, sum(per_length.values()) / len(per_length)))
        self.eval_s += time.perf_counter() - start


def _counting_trainer(base: type) -> type:
    """``base`` (TRL's DistillationTrainer) counting the response tokens it sampled."""

    class CountingTrainer(base):
        student_tokens = 0

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = super()._generate_and_score_completions(inputs)
            # completion_mask: (B, C), 1 up to and including the first </s> of each sampled answer
            if self.model.training:
                self.student_tokens += int(out["completion_mask"].sum())
            return out

    return CountingTrainer


def _go_offline() -> None:
    """No network for TRL, transformers, datasets or the hub, including modules already imported."""
    os.environ.update(_OFFLINE_ENV)
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def _check_args(steps: int, prompts_per_step: int, responses_per_prompt: int, max_new_tokens: int, lr: float,
                lr_schedule: str, eval_every: int, eval_lengths: Sequence[int]) -> None:  # fmt: skip
    positive = {"steps": steps, "prompts_per_step": prompts_per_step,
                "responses_per_prompt": responses_per_prompt, "max_new_tokens": max_new_tokens,
                "eval_every": eval_every}  # fmt: skip
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not eval_lengths or any(n < 1 for n in eval_lengths):
        raise ValueError(f"eval_lengths: one or more positive digit counts, got {tuple(eval_lengths)!r}")


def _train_prompts(train_jsonl: Path) -> list[str]:
    if not train_jsonl.is_file():
        raise ValueError(f"train_jsonl: no such file {str(train_jsonl)!r}")
    rows = read_dataset(train_jsonl)
    if not rows or any(not isinstance(r.get("prompt"), str) for r in rows):
        raise ValueError(f"train_jsonl: every line needs a string 'prompt' ({train_jsonl})")
    return [r["prompt"] for r in rows]


def step_schedule(prompts: Sequence[str], steps: int, prompts_per_step: int, responses_per_prompt: int,
                  seed: int) -> list[str]:  # fmt: skip
    """The prompts of every step in order: ``prompts_per_step`` drawn without replacement from a seeded
    shuffle (reshuffled when used up), each repeated ``responses_per_prompt`` times in a row. TRL
    samples one answer per row, so a batch of these rows is P prompts × R answers."""
    rng = random.Random(seed)
    order: list[str] = []
    rows: list[str] = []
    for _ in range(steps * prompts_per_step):
        if not order:
            order = list(prompts)
            rng.shuffle(order)
        rows.extend([order.pop()] * responses_per_prompt)
    return rows


def _check_tokenization(tokenizer: Any, prompts: Sequence[str]) -> None:
    """TRL tokenizes plain-text prompts with ``tokenizer(text=...)``; that must equal our encoding."""
    got = tokenizer(text=list(prompts))["input_ids"]
    for prompt, ids in zip(prompts, got, strict=True):
        if list(ids) != encode_prompt(prompt):
            ours = encode_prompt(prompt)
            raise ValueError(f"student tokenizer: {prompt!r} -> {list(ids)}, the platform encodes {ours}")


def trl_config(
    out_dir: Path, *, steps: int, batch: int, max_new_tokens: int, lr: float, lr_schedule: str, seed: int
) -> dict[str, Any]:
    """The ``DistillationConfig`` fields we set; everything else is TRL 1.16's default."""
    return {
        "output_dir": str(out_dir),
        "beta": 1.0,  # reverse KL(student ‖ teacher)
        "temperature": 1.0, "top_k": 0, "top_p": 1.0,  # plain sampling, and the loss at temperature 1
        "max_completion_length": max_new_tokens,
        "per_device_train_batch_size": batch,  # prompts_per_step × responses_per_prompt rows
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": lr,
        "optim": "adamw_torch", "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
        "lr_scheduler_type": lr_schedule, "warmup_steps": 0,
        "shuffle_dataset": False,  # step_schedule already drew the prompts in step order
        "use_cpu": True, "bf16": False, "fp16": False,  # TRL defaults bf16 on
        # TRL defaults gradient checkpointing on (it only costs time on a tiny model); transformers 5.24
        # names it activation_checkpointing and warns about the old name
        "activation_checkpointing": False,
        "disable_dropout": True,
        "report_to": "none", "save_strategy": "no", "logging_steps": 10, "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": seed,
    }  # fmt: skip


def _reset_peak_rss() -> bool:
    try:  # "5" resets VmHWM (Linux >= 4.0), so the peak read later is the training's
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(teacher_dir: Path, student_dir: Path, train_jsonl: Path, out_dir: Path, *, steps: int,
            prompts_per_step: int, responses_per_prompt: int, max_new_tokens: int, lr: float,
            eval_every: int, eval_lengths: Sequence[int], lr_schedule: str = "constant", seed: int = 0,
            eval_count: int = 50, final_count: int = 200, kl_count: int = 100) -> dict[str, Any]:  # fmt: skip
    """Train the student with TRL's DistillationTrainer; accuracy, curve, KL, time and token counts.

    ``eval_count`` held-out problems per length for each curve point; ``final_count`` and ``kl_count``
    for the final accuracy and KL (``arithmetic_models``' defaults). ``wall_s`` spans
    ``trainer.train()`` less the curve's evaluations: it excludes loading the models and building
    the trainer.
    """
    _check_args(steps, prompts_per_step, responses_per_prompt, max_new_tokens, lr, lr_schedule, eval_every,
                eval_lengths)  # fmt: skip
    prompts = _train_prompts(train_jsonl)
    _go_offline()
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(student_dir, padding_side="left", truncation_side="left")
    _check_tokenization(tokenizer, prompts)
    teacher, student = load(teacher_dir), load(student_dir)
    fields = trl_config(out_dir / "trl", steps=steps, batch=prompts_per_step * responses_per_prompt,
                        max_new_tokens=max_new_tokens, lr=lr, lr_schedule=lr_schedule, seed=seed)  # fmt: skip
    rows = step_schedule(prompts, steps, prompts_per_step, responses_per_prompt, seed)
    curve = _Curve(eval_every, eval_lengths, eval_count)
    trainer = _counting_trainer(DistillationTrainer)(
        model=student, teacher_model=teacher, args=DistillationConfig(**fields),
        train_dataset=Dataset.from_list([{"prompt": p} for p in rows]), processing_class=tokenizer,
        callbacks=[curve],
    )  # fmt: skip
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints TRL's logs to stdout, where the CLI writes JSON
    peak_is_training = _reset_peak_rss()
    start_mb = _peak_rss_mb()  # right after the reset, the peak is the current resident set
    start = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - start - curve.eval_s
    peak_mb = _peak_rss_mb()
    trained = trainer.model
    trained.eval()
    accuracy, wrong = grade(trained, eval_lengths, count=final_count)
    kl = kl_to_teacher(trained, teacher, eval_lengths, count=kl_count)
    sampled = sampled_exact_match(trained, eval_lengths, count=final_count)
    trained.save_pretrained(out_dir / "trl" / "student")
    tokenizer.save_pretrained(out_dir / "trl" / "student")
    tokens = trainer.student_tokens
    return {
        "accuracy": accuracy,
        "wrong_digits": wrong,
        "sampled": sampled,
        "curve": curve.points,
        "kl": kl,
        "wall_s": wall_s,
        "student_tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "peak_rss_mb": peak_mb,
        "rss_at_start_mb": start_mb,  # models, TRL and torch loaded, before trainer.train()
        "peak_rss_scope": "training" if peak_is_training else "process",
        "threads": torch.get_num_threads(),
        # TRL's own per-token reverse KL on its samples, every logging_steps steps
        "trl_loss": [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
        "trl_config": fields,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--student", type=Path, required=True, help="initial student (not modified)")
    p.add_argument("--train", type=Path, required=True, help="train JSONL from arithmetic.write_dataset")
    p.add_argument("--out", type=Path, default=Path("/tmp/trl_baseline"))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--responses-per-prompt", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--eval-count", type=int, default=50, help="held-out problems per length per curve point")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    result = run_trl(
        a.teacher, a.student, a.train, a.out, steps=a.steps, prompts_per_step=a.prompts_per_step,
        responses_per_prompt=a.responses_per_prompt, max_new_tokens=a.max_new_tokens, lr=a.lr,
        lr_schedule=a.lr_schedule, eval_every=a.eval_every, eval_lengths=a.eval_lengths, seed=a.seed,
        eval_count=a.eval_count,
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
