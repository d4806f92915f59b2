"""Checkpoints restore everything a resumed run needs, half-written ones are ignored, and policy
weights are published atomically with a monotonic version (RELIABILITY 11, 12)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from contracts import keys
from contracts.redis_server import make_client
from learner.applied import AppliedIds
from learner.checkpoint import (
    Checkpoint,
    CheckpointError,
    StaleVersion,
    capture_rng,
    latest_checkpoint_dir,
    load_checkpoint,
    load_latest,
    publish_weights,
    restore_rng,
    save_checkpoint,
)
from tests.redis_fixtures import embedded


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.drop = torch.nn.Dropout(0.3)
        self.out = torch.nn.Linear(8, 16, bias=False)
        self.out.weight = self.emb.weight  # tied, as many LMs are

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.emb(ids)))  # (B, T, V)


def _step(model: Tiny, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    opt.zero_grad()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return float(loss.detach())


def _fresh() -> tuple[Tiny, torch.optim.Optimizer]:
    model = Tiny()
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def _save(root: Path, step: int, model: Tiny, opt: torch.optim.Optimizer, **kw: object) -> Path:
    ckpt = Checkpoint(step=step, model=model.state_dict(), optimizer=opt.state_dict(),
                      schedule={"lambda": {"exact_match": 0.5, "since_step": step}}, rng=capture_rng(),
                      applied=AppliedIds({"r1": "1-0"}, total=7).to_state(), **kw)  # type: ignore[arg-type]
    return save_checkpoint(root, ckpt)


def _resume(root: Path) -> tuple[Tiny, torch.optim.Optimizer, Checkpoint]:
    state = load_latest(root)
    assert state is not None
    model, opt = _fresh()
    model.load_state_dict(state.model)
    opt.load_state_dict(state.optimizer)
    restore_rng(state.rng)
    return model, opt, state


def test_two_resumes_give_the_same_next_loss_as_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = torch.randint(0, 16, (4, 4, 9))  # 4 steps of (B=4, T=9)
    model, opt = _fresh()
    for i in range(2):
        _step(model, opt, data[i])
    _save(tmp_path, 2, model, opt, extra={"policy_version": 2})
    uninterrupted = [_step(model, opt, data[i]) for i in (2, 3)]  # dropout draws from the RNG
    for _ in range(2):
        resumed, ropt, state = _resume(tmp_path)
        assert state.step == 2 and state.extra == {"policy_version": 2}
        assert state.schedule == {"lambda": {"exact_match": 0.5, "since_step": 2}}
        assert AppliedIds.from_state(state.applied) == AppliedIds({"r1": "1-0"}, total=7)
        assert [_step(resumed, ropt, data[i]) for i in (2, 3)] == uninterrupted


def test_rng_states_round_trip() -> None:
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(json.loads(json.dumps(state)))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_tied_weights_are_saved_and_restored(tmp_path: Path) -> None:
    model, opt = _fresh()
    path = _save(tmp_path, 0, model, opt)
    state = load_checkpoint(path)
    assert torch.equal(state.model["emb.weight"], state.model["out.weight"])


def test_half_written_checkpoints_are_ignored_and_the_pointer_moves_last(tmp_path: Path) -> None:
    model, opt = _fresh()
    _save(tmp_path, 1, model, opt)
    good = _save(tmp_path, 2, model, opt)
    # A save killed before its rename: a temp dir without manifest.
    (tmp_path / ".tmp-step-00000003-999").mkdir()
    (tmp_path / ".tmp-step-00000003-999" / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint_dir(tmp_path) == good
    # A damaged target of the pointer (truncated file): fall back to the newest complete one.
    (good / "model.safetensors").write_bytes(b"\0" * 3)
    assert latest_checkpoint_dir(tmp_path) == tmp_path / "step-00000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(good)
    saved = _save(tmp_path, 3, model, opt)
    assert (tmp_path / "latest").read_text() == saved.name
    assert not list(tmp_path.glob(".tmp-*"))  # temp dirs of killed saves are cleaned


def test_old_checkpoints_are_pruned_and_a_redone_step_replaces_its_dir(tmp_path: Path) -> None:
    model, opt = _fresh()
    for step in range(5):
        _save(tmp_path, step, model, opt)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [f"step-0000000{i}" for i in (2, 3, 4)]
    again = _save(tmp_path, 3, model, opt)  # after a restart from step 2
    assert latest_checkpoint_dir(tmp_path) == again
    with pytest.raises(CheckpointError, match="step"):
        _save(tmp_path, -1, model, opt)


def test_fresh_run_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "none") is None


@pytest.fixture
def client(tmp_path: Path) -> Iterator[redis.Redis]:
    with embedded(tmp_path / "redis") as server:
        c = make_client(server.url)
        yield c
        c.close()


@pytest.mark.integration
def test_publish_weights_writes_file_then_version_then_notice(tmp_path: Path, client: redis.Redis) -> None:
    pubsub = client.pubsub()
    pubsub.subscribe(keys.weights_channel("run-w"))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    model, _ = _fresh()
    path = publish_weights(tmp_path, "run-w", 3, model.state_dict(), client)
    assert path.name == "policy-00000003.safetensors" and path.exists()
    assert client.get(keys.policy_version("run-w")) == b"3"
    notice = pubsub.get_message(timeout=2)
    assert notice is not None and json.loads(notice["data"]) == {"version": 3, "path": str(path)}
    publish_weights(tmp_path, "run-w", 3, model.state_dict(), client)  # a restarted learner re-announces
    with pytest.raises(StaleVersion, match="version"):
        publish_weights(tmp_path, "run-w", 2, model.state_dict(), client)
    assert client.get(keys.policy_version("run-w")) == b"3"
    assert not (tmp_path / "weights" / "policy-00000002.safetensors").exists()
    for v in range(4, 8):
        publish_weights(tmp_path, "run-w", v, model.state_dict(), client)
    assert len(list((tmp_path / "weights").glob("policy-*"))) == 3
    pubsub.close()
