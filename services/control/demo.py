"""``distill demo``: a complete distillation on the local stack, with nothing to download.

Builds a tiny teacher and a smaller student that share a tokenizer (random weights, saved
offline), a prompt set with a verifiable answer, starts the whole platform (``LocalStack``),
registers the teacher, submits a hybrid run (dense KL to the teacher + a regex reward through
the sparse term, λ on a linear schedule), follows it with a progress bar, and ends with the
first and last step's KL and reward and a PNG of both over steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.control.client import ApiClient
from services.control.demo_models import VOCAB
from services.control.plot import plot_run
from services.control.stack import LocalStack, StackConfig


@dataclass
class DemoConfig:
    work_dir: Path = Path("runs/demo")
    steps: int = 60
    api_port: int = 8000
    workers: int = 1


def _models(work: Path) -> tuple[Path, Path]:
    """Teacher (trained to count) and student (random, narrower), built once, reused later."""
    teacher, student = work / "models" / "teacher", work / "models" / "student"
    for path, role in ((teacher, "teacher"), (student, "student")):
        if not (path / "config.json").exists():
            cmd = [sys.executable, "-m", "services.control.demo_models", str(path), "--role", role]
            subprocess.run(cmd, check=True, capture_output=True)
    return teacher, student


def _dataset(work: Path) -> Path:
    """Counting prompts of three words; the reward asks for the next word anywhere in the response."""
    path = work / "prompts.jsonl"
    words = [f"w{i}" for i in range(VOCAB - 4)]
    with path.open("w") as out:
        for i in range(len(words) - 3):
            prompt = " ".join(words[i : i + 3])
            out.write(json.dumps({"prompt": prompt, "pattern": rf"\b{words[i + 3]}\b"}) + "\n")
    return path


def run_spec(student: Path, dataset: Path, steps: int) -> dict[str, Any]:
    return {
        "name": "demo",
        "student": str(student.resolve()),
        "dataset": str(dataset.resolve()),
        "teachers": [{"name": "tiny-teacher", "weight": 1.0}],
        "rewards": [{"name": "regex", "verifier": "regex",
                     "schedule": {"kind": "linear", "lambda0": 0.1, "alpha": 0.05}}],
        "objective": {"gamma": 0.0, "support": "full", "baseline": "leave_one_out"},
        "sampling": {"responses_per_prompt": 4, "prompts_per_step": 4, "max_new_tokens": 8},
        "optimizer": {"lr": 1e-2},
        "steps": steps, "checkpoint_interval": 10, "max_staleness": 1,
    }  # fmt: skip


def _summary(points: list[dict[str, Any]]) -> str:
    first, last = points[0]["values"], points[-1]["values"]
    return (
        f"dense KL to the teacher: {first['dense_kl']:.4f} (step 1) -> {last['dense_kl']:.4f} "
        f"(step {int(points[-1]['step'])})\n"
        f"mean reward:             {first['reward/regex']:.3f} (step 1) -> {last['reward/regex']:.3f}"
    )


def run_demo(cfg: DemoConfig, follow: Any) -> int:
    """Run the demo; ``follow(client, run_id)`` shows progress and returns the final run state."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    print("building the tiny teacher and student ...", flush=True)
    teacher, student = _models(cfg.work_dir)
    dataset = _dataset(cfg.work_dir)
    stack = LocalStack(StackConfig(cfg.work_dir, {"tiny-teacher": teacher}, cfg.api_port, cfg.workers))
    print(f"starting the local stack (logs in {cfg.work_dir / 'logs'}) ...", flush=True)
    try:
        stack.start()
        with ApiClient(stack.api_url, stack.cfg.token) as client:
            client.request(
                "POST",
                "/v1/teachers",
                json={"name": "tiny-teacher", "address": stack.teacher_addresses["tiny-teacher"]},
            )
            run_id = client.create_run(run_spec(student, dataset, cfg.steps))["id"]
            final = follow(client, run_id)
            points = client.metrics(run_id)
        if final["status"] != "succeeded" or not points:
            print(f"run {run_id} ended {final['status']}: {final.get('error', '')}", file=sys.stderr)
            return 1
        png = plot_run(run_id, points, cfg.work_dir / "demo.png")
        print(_summary(points))
        print(f"plot: {png}")
        return 0
    finally:
        stack.stop()
