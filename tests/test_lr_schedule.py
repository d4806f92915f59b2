"""The learning-rate schedule of a run (contracts.runspec.OptimizerSpec.schedule): the same rates as
transformers' schedulers of the same names, validation that names the field, and the learner
stepping at the scheduled rate, also after a resume (real redis-server, tiny real student)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import get_scheduler

from contracts.redis_server import make_client
from contracts.runspec import LR_SCHEDULES, OptimizerSpec, RunSpec, lr_at
from learner.train import Learner, LearnerConfig
from services.teacher.tiny_model import TinySpec, build_tiny_model
from tests.redis_fixtures import embedded
from tests.test_run_options_learner import _rollout

HF_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def test_the_spec_offers_every_schedule_the_learner_knows() -> None:
    assert OptimizerSpec.model_fields["schedule"].annotation.__args__ == LR_SCHEDULES  # type: ignore[union-attr]


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize(("steps", "warmup"), [(10, 0), (10, 3), (7, 7), (1, 0)])
def test_rates_are_those_of_transformers_schedulers(schedule: str, steps: int, warmup: int) -> None:
    o = OptimizerSpec(lr=0.3, schedule=schedule, warmup_steps=warmup)  # type: ignore[arg-type]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    hf = get_scheduler(HF_NAME[schedule], opt, num_warmup_steps=warmup, num_training_steps=steps)
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    assert [lr_at(o, done, steps) for done in range(steps)] == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_linear_and_cosine_fall_to_zero_and_cosine_is_half_way_at_the_middle() -> None:
    linear, cosine = OptimizerSpec(lr=1.0, schedule="linear"), OptimizerSpec(lr=1.0, schedule="cosine")
    assert lr_at(linear, 0, 100) == 1.0 and lr_at(linear, 100, 100) == 0.0 and lr_at(linear, 150, 100) == 0.0
    assert lr_at(cosine, 50, 100) == pytest.approx(0.5) and lr_at(cosine, 100, 100) == pytest.approx(0.0)
    assert lr_at(OptimizerSpec(lr=1.0), 99, 100) == 1.0  # the default holds the rate


@pytest.mark.parametrize(
    ("optimizer", "field"),
    [({"schedule": "step"}, "optimizer.schedule"), ({"warmup_steps": -1}, "optimizer.warmup_steps"),
     ({"warmup_steps": 11}, "optimizer.warmup_steps")],
)  # fmt: skip
def test_bad_schedules_name_the_field(optimizer: dict[str, object], field: str) -> None:
    spec = {
        "student": "s",
        "dataset": "d.jsonl",
        "teachers": [{"name": "t0"}],
        "steps": 10,
        "optimizer": optimizer,
    }
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate(spec)
    located = [".".join(map(str, e["loc"])) for e in err.value.errors()]
    assert field in located or field in str(err.value)


def test_the_learner_steps_at_the_scheduled_rate_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    student = build_tiny_model(tmp_path / "student", TinySpec(vocab_size=24, hidden_size=16, seed=2))
    spec = RunSpec.model_validate({
        "student": str(student), "dataset": "d.jsonl", "teachers": [{"name": "t0"}], "steps": 4,
        "optimizer": {"lr": 0.01, "schedule": "cosine", "warmup_steps": 1},
    })  # fmt: skip
    tokens = [2, 5, 7, 9, 11, 4]
    rollouts = [_rollout(tokens[: 5 + i % 2], 2, v=24, k=32, seed=i, group=i % 2) for i in range(4)]
    expected = [lr_at(spec.optimizer, done, 4) for done in range(4)]
    assert expected[0] == 0.0 and expected[1] == 0.01 and 0.0 < expected[3] < expected[2] < 0.01
    cfg = LearnerConfig(run_id="lr", run_dir=tmp_path / "run", consumer="learner")
    with embedded(tmp_path / "redis") as server:
        client = make_client(server.url)
        first = Learner(cfg, client, spec)
        rates = []
        for _ in range(2):
            rates.append(first.train_step(rollouts, len(rollouts))["lr"])
            assert first.optimizer.param_groups[0]["lr"] == rates[-1]
            first.step += 1
        first._checkpoint()
        resumed = Learner(cfg, client, spec)  # a new process after the first one died
        assert resumed.step == 2
        for _ in range(2):
            rates.append(resumed.train_step(rollouts, len(rollouts))["lr"])
            resumed.step += 1
        client.close()
    assert rates == expected
