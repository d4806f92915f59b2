"""benchmarks/trl_baseline.py: TRL's DistillationTrainer on tiny random models, two optimizer steps."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.compare import Budget, Result, curves, offline_loss, stack_specs
from benchmarks.trl_baseline import run_trl, step_schedule
from contracts.runspec import RunSpec
from services.control.arithmetic import WORDS, answer_room, write_dataset
from services.control.arithmetic_models import load
from services.teacher.tiny_model import TinySpec, build_tiny_model

# TRL 1.16 reads model.is_gradient_checkpointing, which transformers 5.24 deprecates
TRL_DEPRECATION = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
KEYS = {"accuracy", "wrong_digits", "sampled", "curve", "kl", "wall_s", "student_tokens", "tokens_per_s"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trl")
    teacher = TinySpec(hidden_size=32, num_layers=2, num_heads=2, max_length=64, seed=1, add_bos=True)
    student = TinySpec(hidden_size=16, num_layers=1, num_heads=2, max_length=64, seed=2, add_bos=True)
    return {
        "teacher": build_tiny_model(root / "teacher", teacher, WORDS),
        "student": build_tiny_model(root / "student", student, WORDS),
        "train": write_dataset(root / "train.jsonl", (1, 2, 3), "train", 20, seed=0),
    }


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.filterwarnings(TRL_DEPRECATION)
def test_two_steps_train_the_student_and_count_its_tokens(models: dict[str, Path], tmp_path: Path) -> None:
    steps, prompts, responses, max_new = 2, 2, 3, 4
    before = _digest(models["student"])
    result = run_trl(
        models["teacher"], models["student"], models["train"], tmp_path, steps=steps,
        prompts_per_step=prompts, responses_per_prompt=responses, max_new_tokens=max_new, lr=1e-2,
        lr_schedule="cosine", eval_every=1, eval_lengths=(1, 2),
        seed=0, eval_count=4, final_count=4, kl_count=4,
    )  # fmt: skip
    assert result.keys() >= KEYS
    for key in ("accuracy", "sampled"):
        assert set(result[key]) == {1, 2} and all(0.0 <= a <= 1.0 for a in result[key].values())
    # an n-digit problem's answer has n + 1 digits; a greedy answer is cut at answer_room(n) tokens
    assert all(0.0 <= result["wrong_digits"][n] <= answer_room(n) for n in (1, 2))
    assert [step for step, _ in result["curve"]] == [0, 1, 2]
    assert result["kl"] >= 0.0 and result["wall_s"] > 0.0
    # every sampled answer has at least one token and at most max_new_tokens
    rows = steps * prompts * responses
    assert rows <= result["student_tokens"] <= rows * max_new
    assert result["tokens_per_s"] == pytest.approx(result["student_tokens"] / result["wall_s"])
    assert result["trl_config"]["beta"] == 1.0 and result["trl_config"]["lr_scheduler_type"] == "cosine"

    assert _digest(models["student"]) == before  # the initial student is not touched
    initial, trained = load(models["student"]).state_dict(), load(tmp_path / "trl" / "student").state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


def test_schedule_is_prompt_groups_without_replacement() -> None:
    prompts = [f"p{i}" for i in range(5)]
    rows = step_schedule(prompts, steps=4, prompts_per_step=2, responses_per_prompt=3, seed=7)
    assert len(rows) == 4 * 2 * 3
    groups = [rows[i : i + 3] for i in range(0, len(rows), 3)]
    assert all(len(set(g)) == 1 for g in groups)  # each prompt's responses sit together
    firsts = [g[0] for g in groups]
    assert sorted(firsts[:5]) == prompts  # one pass over the prompts before any repeats
    assert step_schedule(prompts, 4, 2, 3, seed=7) == rows
    assert step_schedule(prompts, 4, 2, 3, seed=8) != rows


@pytest.mark.parametrize(
    ("change", "field"),
    [({"steps": 0}, "steps"), ({"responses_per_prompt": -1}, "responses_per_prompt"), ({"lr": 0.0}, "lr"),
     ({"lr_schedule": "step"}, "lr_schedule"),
     ({"eval_lengths": ()}, "eval_lengths"), ({"train_jsonl": Path("/nonexistent.jsonl")}, "train_jsonl")],
)  # fmt: skip
def test_bad_input_names_the_field(models: dict[str, Path], tmp_path: Path, change: dict, field: str) -> None:
    args = dict(teacher_dir=models["teacher"], student_dir=models["student"], train_jsonl=models["train"],
                out_dir=tmp_path / "out", steps=1, prompts_per_step=1, responses_per_prompt=1,
                max_new_tokens=2, lr=1e-3, eval_every=1, eval_lengths=(1,))  # fmt: skip
    with pytest.raises(ValueError, match=field):
        run_trl(**{**args, **change})
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_unlike_the_platforms_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", TinySpec(hidden_size=16, num_layers=1, max_length=64))
    with pytest.raises(ValueError, match="student tokenizer"):
        run_trl(models["teacher"], other, models["train"], tmp_path / "out", steps=1, prompts_per_step=1,
                responses_per_prompt=1, max_new_tokens=2, lr=1e-3, eval_every=1,
                eval_lengths=(1,))  # fmt: skip


@pytest.mark.parametrize("methods", ["core", "dense,trl"])
def test_compare_without_trl_says_how_to_get_it_before_any_work(tmp_path: Path, methods: str) -> None:
    """`make demo` installs no TRL: compare stops before it trains the demo's models, and says why."""
    hide_trl = "import sys; sys.modules['trl'] = None; from benchmarks.compare import main; main()"
    demo, work = tmp_path / "demo", tmp_path / "compare"
    args = ["--demo-dir", str(demo), "--work-dir", str(work), "--methods", methods]
    out = subprocess.run([sys.executable, "-c", hide_trl, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "--methods: trl needs TRL 1.16.0" in out.stderr and "make .venv/.installed" in out.stderr
    assert not demo.exists() and not work.exists()


def test_compare_refuses_a_negative_max_staleness_before_any_work(tmp_path: Path) -> None:
    demo, work = tmp_path / "demo", tmp_path / "compare"
    args = ["--demo-dir", str(demo), "--work-dir", str(work), "--max-staleness", "-1"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.compare", *args], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 2 and "--max-staleness: 0 or more" in out.stderr, out.stderr
    assert not demo.exists() and not work.exists()


def test_compare_gives_every_method_on_the_stack_the_same_budget(tmp_path: Path) -> None:
    b = Budget(steps=40, lr=2e-4, lr_schedule="linear", max_staleness=0, seed=3)
    specs = {name: RunSpec.model_validate(spec) for name, spec in stack_specs(tmp_path, tmp_path, b).items()}
    budgets = {
        (s.steps, s.seed, s.optimizer.lr, s.optimizer.schedule, s.max_staleness, s.sampling.prompts_per_step,
         s.sampling.responses_per_prompt, s.sampling.max_new_tokens)
        for s in specs.values()
    }  # fmt: skip
    sampling = (b.prompts_per_step, b.responses_per_prompt, b.max_new_tokens)
    assert budgets == {(40, 3, 2e-4, "linear", 0, *sampling)}


def test_the_plot_starts_every_method_from_the_shared_measurement() -> None:
    """TRL measures step 0 itself; the plot's step 0 is the one measurement every method shares."""

    def run(curve: list[tuple[int, float]]) -> Result:
        return Result("m", {}, 0.0, 0.0, 1.0, 1, curve)

    runs = {"dense": [run([(300, 0.5), (600, 0.7)]), run([(300, 0.7), (600, 0.9)])],
            "trl": [run([(0, 0.9), (300, 0.6)])]}  # fmt: skip
    want = {"dense": [(0, 0.35), (300, 0.6), (600, 0.8)], "trl": [(0, 0.35), (300, 0.6)]}
    assert curves(runs, 0.35) == want


@pytest.mark.parametrize("kind", ["seq_kd", "token_kd", "token_rkl"])
def test_offline_losses_match_a_float64_reference(models: dict[str, Path], kind: str) -> None:
    """compare's off-policy losses, averaged over response tokens only (prompt and -1 padding carry
    none): SFT on the sampled token, forward KL(teacher ‖ student) or reverse KL(student ‖ teacher)."""
    teacher, student = load(models["teacher"]), load(models["student"])
    rows = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 5, 6, 10, -1, -1]])  # prompt of 3, responses of 3 and 1
    loss, n = offline_loss(kind, student, teacher, rows, prompt_len=3)
    ids = rows.clamp(min=0)
    s = torch.log_softmax(student(ids).logits.double(), -1)
    t = torch.log_softmax(teacher(ids).logits.double(), -1)
    want = []
    for r, pos in [(0, 2), (0, 3), (0, 4), (1, 2)]:  # positions predicting a response token
        sp, tp = s[r, pos], t[r, pos]
        want.append({"seq_kd": -sp[ids[r, pos + 1]], "token_kd": (tp.exp() * (tp - sp)).sum(),
                     "token_rkl": (sp.exp() * (sp - tp)).sum()}[kind])  # fmt: skip
    assert n == 4
    assert loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)  # float32 logits
