"""Durable learner checkpoints and versioned policy weights.

A checkpoint is a directory ``step-00000012/`` under the run's checkpoint folder holding
``model.safetensors``, ``optimizer.pt``, ``state.json`` (step, λ-schedule state, RNG states,
applied rollout ids, extras) and ``manifest.json`` (file sizes). It is written to a hidden temp
directory, every file fsynced, then renamed into place; the ``latest`` pointer file is replaced
last (RELIABILITY 12). Loading follows the pointer and checks the manifest; a missing or damaged
target falls back to the newest complete directory, and temp directories are never read, so a
checkpoint killed half-written is ignored.

``publish_weights`` writes ``weights/policy-00000012.safetensors`` the same way, then sets the
run's policy version in Redis (only ever upwards) and publishes a notice to the rollout workers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
import safetensors.torch
import torch

from contracts import keys

logger = logging.getLogger(__name__)

LATEST = "latest"
_FILES = ("model.safetensors", "optimizer.pt", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read."""


@dataclass
class Checkpoint:
    step: int  # optimizer steps taken
    model: dict[str, torch.Tensor]  # model.state_dict()
    optimizer: dict[str, Any]  # optimizer.state_dict()
    schedule: dict[str, Any] = field(default_factory=dict)  # λ schedules etc. (JSON)
    applied: dict[str, Any] = field(default_factory=dict)  # learner.applied.AppliedIds.to_state()
    rng: dict[str, Any] = field(default_factory=dict)  # capture_rng()
    extra: dict[str, Any] = field(default_factory=dict)  # anything else JSON (policy version, ...)


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states as JSON-able values."""
    py = random.getstate()
    name, keys_, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [name, np.asarray(keys_).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys_, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys_, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied weights are copied because safetensors refuses shared storage."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, separators=(",", ":")))


def _write_dir(tmp: Path, ckpt: Checkpoint) -> None:
    tmp.mkdir(parents=True)
    safetensors.torch.save_file(_cpu_tensors(ckpt.model), str(tmp / "model.safetensors"))
    torch.save(ckpt.optimizer, tmp / "optimizer.pt")
    state = {"step": ckpt.step, "schedule": ckpt.schedule, "applied": ckpt.applied, "rng": ckpt.rng,
             "extra": ckpt.extra}  # fmt: skip
    _write_json(tmp / "state.json", state)
    for name in _FILES:
        _fsync_file(tmp / name)
    _write_json(tmp / "manifest.json", {name: (tmp / name).stat().st_size for name in _FILES})
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)


def _replace_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name)
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def save_checkpoint(root: Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically under ``root``, then move the ``latest`` pointer; keep ``keep`` newest."""
    if ckpt.step < 0:
        raise CheckpointError(f"step: must be >= 0, got {ckpt.step}")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{ckpt.step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    _write_dir(tmp, ckpt)
    final = root / name
    if final.exists():  # a step redone after a restart from an older checkpoint
        trash = root / f".tmp-old-{name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    _fsync_dir(root)
    _replace_pointer(root, name)
    _prune(root, keep, final)
    logger.info("checkpoint %s written", final)
    return final


def _step_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name)


def _prune(root: Path, keep: int, current: Path) -> None:
    dirs = [d for d in _step_dirs(root) if d != current]
    for old in dirs[: max(0, len(dirs) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _complete(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return all((path / n).stat().st_size == manifest[n] for n in _FILES)
    except (OSError, ValueError, KeyError):
        return False


def complete_checkpoint_dirs(root: Path) -> list[Path]:
    """Every complete checkpoint directory under ``root``, oldest first."""
    return [d for d in _step_dirs(root) if _complete(d)]


def latest_checkpoint_dir(root: Path) -> Path | None:
    """The directory the pointer names if complete, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if target.name.startswith("step-") and _complete(target):
            return target
        logger.warning("checkpoint pointer names %s, which is incomplete; scanning", target)
    complete = complete_checkpoint_dirs(root)
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read one checkpoint directory (tensors on CPU)."""
    if not _complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (manifest missing or sizes differ)")
    state = json.loads((path / "state.json").read_text())
    return Checkpoint(
        step=int(state["step"]),
        model=safetensors.torch.load_file(str(path / "model.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        schedule=state["schedule"], applied=state["applied"], rng=state["rng"], extra=state["extra"],
    )  # fmt: skip


def load_latest(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``root``, or None for a fresh run."""
    path = latest_checkpoint_dir(root)
    return load_checkpoint(path) if path is not None else None


# -- weights for the rollout workers ---------------------------------------------------------------

# KEYS: version, weights hash, channel   ARGV: version, path, notice  -> 1 published | 0 older than current
_PUBLISH_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) < current then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'version', ARGV[1], 'path', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""


class StaleVersion(CheckpointError):
    """A weights version lower than the one already published."""


def weights_path(run_dir: Path, version: int) -> Path:
    return run_dir / "weights" / f"policy-{version:08d}.safetensors"


def publish_weights(
    run_dir: Path, run_id: str, version: int, state_dict: dict[str, torch.Tensor], client: redis.Redis,
    keep: int = 3,
) -> Path:  # fmt: skip
    """Write the versioned weights atomically, then advance the run's version and notify the workers.

    Re-publishing the current version (after a learner restart) is allowed; a lower one raises
    :class:`StaleVersion` and changes nothing in Redis.
    """
    if version < 0:
        raise CheckpointError(f"version: must be >= 0, got {version}")
    current = client.get(keys.policy_version(run_id))
    if current is not None and version < int(current):
        raise StaleVersion(f"version: {version} is older than the published {int(current)}")
    path = weights_path(run_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    safetensors.torch.save_file(_cpu_tensors(state_dict), str(tmp), metadata={"version": str(version)})
    # The rename keeps readers from ever seeing a partial file. No fsync: this runs every step,
    # and after a machine crash the learner republishes from its checkpoint under a new version.
    os.replace(tmp, path)
    notice = json.dumps({"version": version, "path": str(path)})
    ok = client.eval(
        _PUBLISH_LUA, 3,
        keys.policy_version(run_id), keys.policy_weights(run_id), keys.weights_channel(run_id),
        version, str(path), notice,
    )  # fmt: skip
    if not int(ok):
        raise StaleVersion(f"version: {version} is older than the published one")
    for old in sorted(path.parent.glob("policy-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path
