"""Distillation methods side by side on the demo's addition task (issue 8).

Every method starts from the same warmed-up student and learns from the same teacher (the demo's,
built and cached by ``distill demo``) for the same budget: ``steps`` optimizer steps of
``prompts × responses`` sequences of at most ``max_new_tokens`` tokens, so the same number of
sampled sequences (the table prints the tokens each actually used).

- ``seq_kd``: off-policy sequence KD, SFT on teacher samples (Kim & Rush; seed 002 ch. 2).
- ``token_kd``: off-policy token-level KD, forward KL to the teacher's full distribution on
  teacher samples.
- ``token_rkl``: reverse KL to the teacher's full distribution on teacher samples: dense's
  objective on the teacher's prefixes instead of the student's, so the two rows differ only in
  whose samples they learn on (seed 003's prefix source × KL direction; ``+forward_kl`` is the
  fourth pairing, on-policy forward KL).
- ``dense``: on-policy KD, γ=0 and no reward (seed 000, table 5.5).
- ``hybrid``: γ=0 plus the exact-answer reward through the sparse term (the demo's run).
- ``full_traj``: γ=1 plus the reward, the exact gradient of eq. 3 (Theorem 1).
- ``pure_rl``: the reward alone, no teacher.
- ``trl``: TRL's ``DistillationTrainer`` (on-policy, reverse KL), ``benchmarks.trl_baseline``.
- with ``--methods all``, the run options of issue 9 on top of ``hybrid`` (rows named after the
  option), and GKD's forward KL and JSD (β = 0.5) in place of its reverse KL (seed 002 ch. 3).

Our on-policy methods run through the real local stack (embedded Redis, teacher and reward
services, control plane, one learner and one rollout worker), one run after another; their wall
time is from the learner starting the run (its student loaded, ``started_at``) to the run's end,
as TRL's excludes loading the models and building its trainer; the rollout worker's own start
(loading the student, checking the teacher's tokenizer) falls inside it. The off-policy ones and
TRL run in this process.
Held-out greedy exact match is measured on checkpoints along the way (the PNG) and at the end
(the table, short = 2-digit and long = 8-digit operands), with exact match of the student's
temperature-1 samples at the long length (4 per problem) and the mean number of wrong digits of a
long greedy answer (the "total error" that DAgger bounds, seed 002 ch. 2); KL is the mean
per-token KL(student ‖ teacher) on the final student's own samples of held-out prompts. Every
method runs once per seed (sampling, prompt order); the table gives means, accuracy ± its std
over seeds.
"Student tokens" are the response tokens trained on: sampled by the student (on-policy, TRL) or
by the teacher (off-policy, whose wall time includes that sampling).

    .venv/bin/python -m benchmarks.compare                  # the eight above x 3 seeds (~20 min, 2 cores)
    .venv/bin/python -m benchmarks.compare --methods all    # ... and issue 9's options on top of hybrid
    .venv/bin/python -m benchmarks.compare --methods hybrid,trl --steps 50 --seeds 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from contracts.runspec import LR_SCHEDULES, OptimizerSpec
from learner.checkpoint import complete_checkpoint_dirs
from learner.train import set_lr
from services.control import arithmetic_models as am
from services.control.arithmetic import MAX_DIGITS, answer_room, read_dataset, write_dataset
from services.control.client import ApiClient
from services.control.demo import (
    EVAL_LENGTHS,
    DemoConfig,
    build_models,
    register_teacher,
    run_spec,
    stack_config,
)
from services.control.stack import LocalStack, StackError, check_api_port
from services.rollout.sampling import SamplingConfig, sample

SHORT, LONG = EVAL_LENGTHS[0], EVAL_LENGTHS[-1]
TERMINAL = ("succeeded", "failed", "stopped")


@dataclass
class Budget:
    # At 150 steps off-policy led at 8 digits: SFT on the teacher's answers goes on with the warm-up
    # and learns fastest. By 600 on-policy has caught up (the README's comparison; HISTORY.md).
    steps: int = 600
    prompts_per_step: int = 8
    responses_per_prompt: int = 4
    max_new_tokens: int = answer_room(MAX_DIGITS)  # the longest answer, </s> and one correction
    lr: float = 5e-4  # at 1e-3 every method's accuracy swung by tens of points between checkpoints
    # held at 5e-4, each run ended wherever its last steps left it: a method's 8-digit accuracy
    # spread up to 43.5 points over three seeds; decayed to 0, by 1-6 (HISTORY.md)
    lr_schedule: str = "cosine"
    max_staleness: int = 1  # our stack's runs: policy versions a sample may lag (the run spec's default)
    curve_points: int = 6  # accuracy measured this many times along each run
    curve_count: int = 100  # held-out problems per length for each curve point, every method's
    eval_count: int = 200  # held-out problems per length for the final table
    seed: int = 0

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.curve_points)


@dataclass
class Result:
    method: str
    accuracy: dict[int, float]
    wrong_digits: float  # per held-out answer at the longest length: the seed's "total error"
    kl: float
    wall_s: float
    student_tokens: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    sampled: dict[int, float] = field(default_factory=dict)  # exact match at temperature 1


# -- the methods -----------------------------------------------------------------------------------


def _spec(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            out[section][name] = value
        else:
            out[section] = value
    return out


def stack_specs(student: Path, dataset: Path, b: Budget) -> dict[str, dict[str, Any]]:
    """Run specs of the methods that run on the platform, all derived from the demo's hybrid run."""
    hybrid = run_spec(student, dataset, b.steps)
    hybrid["sampling"] = {
        "responses_per_prompt": b.responses_per_prompt,
        "prompts_per_step": b.prompts_per_step,
        "max_new_tokens": b.max_new_tokens,
    }
    hybrid["optimizer"] = {"lr": b.lr, "schedule": b.lr_schedule}
    hybrid["checkpoint_interval"] = b.eval_every
    hybrid["seed"] = b.seed
    hybrid["max_staleness"] = b.max_staleness
    half = {"kind": "constant", "value": 0.5}
    curriculum = {"start": 4, "step": 2, "gate": 0.3, "max": b.max_new_tokens}
    return {
        "dense": _spec(hybrid, rewards=[]),
        "hybrid": hybrid,
        "full_traj": _spec(hybrid, objective__gamma=1.0),
        "pure_rl": _spec(hybrid, teachers=[]),
        # issue 9's options, each on top of hybrid
        "+prefix_mix": _spec(hybrid, sampling__on_policy_fraction=half),
        "+kl_mix": _spec(hybrid, objective__divergence="kl_mix"),
        "+forward_kl": _spec(hybrid, objective__divergence="forward_kl"),
        "+jsd": _spec(hybrid, objective__divergence="jsd"),
        "+token_importance": _spec(hybrid, objective__token_importance="weight"),
        "+selectkd": _spec(hybrid, objective__selective="spec_k"),
        "+flawed_reject": _spec(hybrid, sampling__max_perplexity=2.0),
        "+top_p": _spec(hybrid, objective__support="teacher_top_p", objective__top_k=8),
        "+length_curriculum": _spec(hybrid, sampling__length_curriculum=curriculum),
    }


OFFLINE = ("seq_kd", "token_kd", "token_rkl")
ORDER = ("seq_kd", "token_kd", "token_rkl", "dense", "hybrid", "full_traj", "pure_rl", "trl")


# -- measuring a student ---------------------------------------------------------------------------


def _mean(acc: dict[int, float]) -> float:
    return sum(acc.values()) / len(acc)


def finish(method: str, model: Any, teacher: Any, b: Budget, wall_s: float, tokens: int,
           curve: list[tuple[int, float]]) -> Result:  # fmt: skip
    acc, wrong = am.grade(model, EVAL_LENGTHS, b.eval_count)
    kl = am.kl_to_teacher(model, teacher, EVAL_LENGTHS)
    sampled = am.sampled_exact_match(model, EVAL_LENGTHS, b.eval_count)
    return Result(method, acc, wrong[LONG], kl, wall_s, tokens, curve, sampled)


# -- off-policy KD, in this process ----------------------------------------------------------------


def _teacher_batches(teacher: Any, prompts: list[str], b: Budget) -> Iterator[tuple[torch.Tensor, int]]:
    """Per step: teacher samples of randomly drawn train prompts, (rows, prompt length), -1 padded.

    Every prompt has the same length (operands are padded), so only responses need padding.
    """
    rng = random.Random(b.seed)
    cfg = SamplingConfig(
        responses_per_prompt=b.responses_per_prompt, temperature=1.0, max_new_tokens=b.max_new_tokens,
        eos_token_id=am.EOS, pad_token_id=am.PAD,
    )  # fmt: skip
    for step in range(b.steps):
        chosen = [am.encode_prompt(p) for p in rng.sample(prompts, b.prompts_per_step)]
        samples = sample(teacher, chosen, cfg, b.seed * 100_003 + step)
        width = max(len(s.response_ids) for s in samples)
        rows = [s.prompt_ids + s.response_ids + [-1] * (width - len(s.response_ids)) for s in samples]
        yield torch.tensor(rows), len(chosen[0])


def offline_loss(
    kind: str, student: Any, teacher: Any, rows: torch.Tensor, prompt_len: int
) -> tuple[torch.Tensor, int]:
    """Mean over response tokens of the SFT loss (seq_kd), or of the forward (token_kd) or reverse
    (token_rkl) KL to the teacher's full distribution."""
    valid = rows >= 0
    ids = rows.clamp(min=0)
    target = valid[:, 1:].clone()
    target[:, : prompt_len - 1] = False  # positions predicting prompt tokens carry no loss
    s_lp = torch.log_softmax(student(input_ids=ids, attention_mask=valid.long()).logits[:, :-1].float(), -1)
    if kind == "seq_kd":
        per_token = -s_lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    else:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=valid.long()).logits[:, :-1].float()
        t_lp = torch.log_softmax(t_logits, -1)
        p_lp, q_lp = (t_lp, s_lp) if kind == "token_kd" else (s_lp, t_lp)
        per_token = (p_lp.exp() * (p_lp - q_lp)).sum(-1)
    n = int(target.sum())
    return per_token[target].sum() / max(n, 1), n


def run_offline(kind: str, teacher_dir: Path, student_dir: Path, prompts: list[str], b: Budget) -> Result:
    torch.manual_seed(b.seed)
    teacher, student = am.load(teacher_dir).eval(), am.load(student_dir)
    opt = torch.optim.AdamW(student.parameters(), lr=b.lr, weight_decay=0.0)
    schedule = OptimizerSpec(lr=b.lr, schedule=b.lr_schedule)  # type: ignore[arg-type]
    wall, tokens, curve = 0.0, 0, []
    batches = _teacher_batches(teacher, prompts, b)
    for step in range(1, b.steps + 1):
        started = time.perf_counter()
        rows, prompt_len = next(batches)  # teacher sampling is part of the method's cost
        student.train()
        loss, n = offline_loss(kind, student, teacher, rows, prompt_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        set_lr(opt, schedule, step - 1, b.steps)
        opt.step()
        tokens += n
        wall += time.perf_counter() - started
        if step % b.eval_every == 0 or step == b.steps:
            curve.append((step, _mean(am.evaluate(student, EVAL_LENGTHS, b.curve_count))))
    return finish(kind, student, teacher, b, wall, tokens, curve)


# -- on-policy methods, through the local stack ----------------------------------------------------


def _wait(client: ApiClient, run_id: str, progress: Callable[[str], None]) -> dict[str, Any]:
    shown = -1
    while True:
        state = client.get_run(run_id)
        if state["step"] != shown and state["step"] % 10 == 0:
            shown = state["step"]
            progress(f"  step {shown}/{state['spec']['steps']}")
        if state["status"] in TERMINAL:
            return state
        time.sleep(0.2)


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, model weights) of every complete checkpoint of a run."""
    dirs = complete_checkpoint_dirs(run_dir / "checkpoints")
    return [(int(d.name.removeprefix("step-")), d / "model.safetensors") for d in dirs]


def timed_run(stack: LocalStack, name: str, spec: dict[str, Any],
              progress: Callable[[str], None]) -> tuple[str, float, int]:  # fmt: skip
    """Run ``spec`` on the stack; its id, wall seconds and trained tokens."""
    with ApiClient(stack.api_url, stack.cfg.token) as client:
        run_id = client.create_run(spec)["id"]
        final = _wait(client, run_id, progress)
        wall = final["updated_at"] - final["started_at"]  # the learner's clock: start → final status
        points = client.metrics(run_id)
    if final["status"] != "succeeded":
        raise RuntimeError(f"{name}: run {run_id} ended {final['status']}: {final.get('error', '')}")
    tokens = int(sum(p["values"].get("tokens") or 0 for p in points if p.get("step") is not None))
    return run_id, wall, tokens


def run_on_stack(stack: LocalStack, name: str, spec: dict[str, Any], teacher: Any, student_dir: Path,
                 b: Budget, progress: Callable[[str], None]) -> Result:  # fmt: skip
    run_id, wall, tokens = timed_run(stack, name, spec, progress)
    ckpts = _checkpoints(stack.cfg.work_dir / "runs" / run_id)
    curve = [(step, _mean(am.evaluate(am.load(student_dir, w), EVAL_LENGTHS, b.curve_count)))
             for step, w in ckpts]  # fmt: skip
    return finish(name, am.load(student_dir, ckpts[-1][1]), teacher, b, wall, tokens, curve)


# -- report ----------------------------------------------------------------------------------------


def _spread(values: list[float], fmt: str = "{:.1%}") -> str:
    """Mean, and ± the standard deviation over seeds when there are several."""
    mean = fmt.format(statistics.fmean(values))
    return mean + (" ± " + fmt.format(statistics.pstdev(values)) if len(values) > 1 else "")


def _speed(rs: list[Result]) -> float:
    """Tokens per second over all seeds: all tokens / all time."""
    return sum(r.student_tokens for r in rs) / sum(r.wall_s for r in rs)


def table(runs: dict[str, list[Result]]) -> str:
    """One row per method: means over the seeds (accuracy ± std), and tokens/s as a ratio to TRL's
    measured in the same process (the baseline; "-" when TRL did not run)."""
    head = (f"| method | exact match {SHORT}-digit | exact match {LONG}-digit "
            f"| {LONG}-digit sampled at T=1 | wrong digits per {LONG}-digit answer | KL to teacher "
            "| wall s | student tokens | tokens/s | tokens/s vs trl |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    baseline = _speed(runs["trl"]) if runs.get("trl") else None
    for method, rs in runs.items():
        wall, tokens = sum(r.wall_s for r in rs), sum(r.student_tokens for r in rs)
        short, long = _spread([r.accuracy[SHORT] for r in rs]), _spread([r.accuracy[LONG] for r in rs])
        ratio = f"{_speed(rs) / baseline:.2f}x" if baseline else "-"
        sampled = _spread([r.sampled[LONG] for r in rs])
        wrong = _spread([r.wrong_digits for r in rs], "{:.3f}")
        lines.append(
            f"| {method} | {short} | {long} | {sampled} | {wrong} "
            f"| {statistics.fmean(r.kl for r in rs):.4f} | {wall / len(rs):.1f} | {tokens // len(rs)} "
            f"| {_speed(rs):.0f} | {ratio} |"
        )
    return "\n".join(lines)


def curves(runs: dict[str, list[Result]], start: float) -> dict[str, list[tuple[int, float]]]:
    """Each method's (step, accuracy averaged over seeds), starting from ``start`` at step 0: every
    method starts from the same student, so the shared measurement stands for all (TRL's callback
    measures step 0 again; counted twice, it would weigh one method's start differently)."""
    out = {}
    for method, rs in runs.items():
        by_step: dict[int, list[float]] = {0: [start]}
        for step, acc in (point for r in rs for point in r.curve if point[0] > 0):
            by_step.setdefault(step, []).append(acc)
        out[method] = [(step, statistics.fmean(by_step[step])) for step in sorted(by_step)]
    return out


def plot(runs: dict[str, list[Result]], start: float, out: Path) -> Path:
    """Held-out exact match (mean over lengths and seeds) against the optimizer step, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    for i, (method, points) in enumerate(curves(runs, start).items()):
        style = "--" if method.startswith("+") else "-"  # issue 9's options dashed
        ax.plot(*zip(*points, strict=True), style, marker="o", label=method, color=colors[i % len(colors)])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out exact match (mean of {', '.join(map(str, EVAL_LENGTHS))}-digit)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best", fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_trl_method(teacher_dir: Path, student_dir: Path, train: Path, work: Path, b: Budget) -> Result:
    from benchmarks.trl_baseline import run_trl

    out = run_trl(teacher_dir, student_dir, train, work / "trl", steps=b.steps,
                  prompts_per_step=b.prompts_per_step, responses_per_prompt=b.responses_per_prompt,
                  max_new_tokens=b.max_new_tokens, lr=b.lr, lr_schedule=b.lr_schedule,
                  eval_every=b.eval_every, eval_lengths=EVAL_LENGTHS, eval_count=b.curve_count,
                  seed=b.seed)  # fmt: skip
    accuracy = {int(k): float(v) for k, v in out["accuracy"].items()}
    curve = [(int(s), float(a)) for s, a in out["curve"]]
    wrong, kl, wall = float(out["wrong_digits"][LONG]), float(out["kl"]), float(out["wall_s"])
    sampled = {int(k): float(v) for k, v in out["sampled"].items()}
    return Result("trl", accuracy, wrong, kl, wall, int(out["student_tokens"]), curve, sampled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("runs/compare"))
    p.add_argument("--demo-dir", type=Path, default=Path("runs/demo"), help="the demo's cached models")
    p.add_argument("--methods", default="core", help="comma-separated names, core (the eight above) or all")
    p.add_argument("--steps", type=int, default=Budget.steps)
    p.add_argument("--lr", type=float, default=Budget.lr, help="every method's learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=Budget.lr_schedule,
                   help="every method's: held, or decayed to 0 at the last step")  # fmt: skip
    p.add_argument("--max-staleness", type=int, default=Budget.max_staleness,
                   help="our on-policy runs: 0 samples from the latest weights (no overlap)")  # fmt: skip
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated; every method runs once per seed")
    a = p.parse_args()
    if a.max_staleness < 0:
        p.error(f"--max-staleness: 0 or more policy versions, got {a.max_staleness}")
    wants_trl = a.methods in ("core", "all") or "trl" in a.methods.split(",")
    if wants_trl and importlib.util.find_spec("trl") is None:  # fail now, not after the other methods
        p.error("--methods: trl needs TRL 1.16.0, a benchmark tool that `make demo` does not install; "
                "run `make .venv/.installed` first, or leave trl out")
    try:
        check_api_port(a.port)  # now, not after the off-policy methods
    except StackError as exc:
        p.error(f"--port: {exc}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    teacher_dir, student_dir = build_models(DemoConfig(work_dir=a.demo_dir))
    train = write_dataset(a.work_dir / "train.jsonl", range(1, 9), "train", per_length=500, seed=0)
    specs = stack_specs(student_dir, train, _budget(a))
    chosen = {"core": list(ORDER), "all": list(ORDER) + [n for n in specs if n not in ORDER]}
    names = chosen.get(a.methods) or a.methods.split(",")
    unknown = [n for n in names if n not in (*OFFLINE, "trl", *specs)]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {[*OFFLINE, 'trl', *specs]}")
    teacher = am.load(teacher_dir).eval()
    start = _mean(am.evaluate(am.load(student_dir), EVAL_LENGTHS, Budget.curve_count))
    runs: dict[str, list[Result]] = {name: [] for name in names}
    for seed in [int(x) for x in a.seeds.split(",")]:
        print(f"== seed {seed}", flush=True)
        b = _budget(a, seed)
        seed_specs = stack_specs(student_dir, train, b)
        for r in _run_all(names, seed_specs, teacher, teacher_dir, student_dir, train, a, b):
            runs[r.method].append(r)
    print(table(runs))
    a.work_dir.mkdir(parents=True, exist_ok=True)
    per_seed = {m: [asdict(r) for r in rs] for m, rs in runs.items()}
    (a.work_dir / "results.json").write_text(json.dumps(per_seed, indent=1))
    print(f"plot: {plot(runs, start, a.work_dir / 'compare.png')}")


def _budget(a: argparse.Namespace, seed: int = 0) -> Budget:
    return Budget(steps=a.steps, lr=a.lr, lr_schedule=a.lr_schedule, max_staleness=a.max_staleness, seed=seed)


def _run_all(names: list[str], specs: dict[str, dict[str, Any]], teacher: Any, teacher_dir: Path,
             student_dir: Path, train: Path, a: argparse.Namespace, b: Budget) -> list[Result]:  # fmt: skip
    prompts = [row["prompt"] for row in read_dataset(train)]
    results = []
    for name in [n for n in names if n in OFFLINE or n == "trl"]:
        print(f"{name} ...", flush=True)
        if name == "trl":
            results.append(run_trl_method(teacher_dir, student_dir, train, a.work_dir, b))
        else:
            results.append(run_offline(name, teacher_dir, student_dir, prompts, b))
    on_stack = [n for n in names if n in specs]
    if on_stack:
        keep_all = ("--keep-checkpoints", "1000")  # every checkpoint is a point of the accuracy curve
        cfg = stack_config(a.work_dir / f"stack-{b.seed}", teacher_dir, a.port, learner_args=keep_all)
        with LocalStack(cfg) as stack, ApiClient(stack.api_url, cfg.token) as client:
            register_teacher(stack, client)
            for name in on_stack:
                print(f"{name} (on the local stack) ...", flush=True)
                results.append(run_on_stack(stack, name, specs[name], teacher, student_dir, b, print))
    return sorted(results, key=lambda r: names.index(r.method))


if __name__ == "__main__":
    main()
