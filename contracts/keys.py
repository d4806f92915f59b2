"""Every Redis key name of the platform, in one place (arq's habit), as functions of the run id.

Nothing else builds a Redis key by string formatting: the control plane, the rollout workers and
the learner all import these, so a renamed key is one edit. All keys of one run share the prefix
``distill:run:{run_id}:`` so ``SCAN MATCH distill:run:{run_id}:*`` finds a run's whole footprint.

    >>> from contracts import keys
    >>> keys.rollout_stream("run-1")
    'distill:run:run-1:rollouts'
"""

from __future__ import annotations

import re

PREFIX = "distill"
# One consumer group per rollout stream: the learner (all its ranks read through rank 0).
LEARNER_GROUP = "learner"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class InvalidRunId(ValueError):
    """A run id that cannot be part of a key (empty, too long, or with ':' / spaces / globs)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run_id {run_id!r}: must match {_RUN_ID.pattern} (letters, digits, '_', '.', '-'; <= 128 chars)"
        )
        self.field = "run_id"


def check_run_id(run_id: str) -> str:
    """``run_id`` unchanged, or :class:`InvalidRunId` (':' and glob characters would alias other keys)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidRunId(str(run_id))
    return run_id


def _run(run_id: str, suffix: str) -> str:
    return f"{PREFIX}:run:{check_run_id(run_id)}:{suffix}"


def run_spec(run_id: str) -> str:
    """String: the run's spec as JSON, written by the control plane."""
    return _run(run_id, "spec")


def runs_index() -> str:
    """Sorted set of all run ids, scored by creation time (control plane)."""
    return f"{PREFIX}:runs"


def rollout_stream(run_id: str) -> str:
    """Stream: one entry per rollout (protobuf bytes); read by :data:`LEARNER_GROUP`."""
    return _run(run_id, "rollouts")


def learner_group(run_id: str) -> str:
    """Consumer group name on :func:`rollout_stream` (group names are scoped per stream)."""
    check_run_id(run_id)
    return LEARNER_GROUP


def dead_letter_stream(run_id: str) -> str:
    """Stream: rollouts that were not trained on, with the reason and the original fields."""
    return _run(run_id, "dead")


def learner_counters(run_id: str) -> str:
    """Hash: learner-side counters (dead letters by reason, duplicates skipped, partial groups)."""
    return _run(run_id, "learner:counters")


def policy_version(run_id: str) -> str:
    """String (int): the newest published policy version; only ever increases."""
    return _run(run_id, "policy:version")


def policy_weights(run_id: str) -> str:
    """Hash: ``version`` and ``path`` of the newest published weights file."""
    return _run(run_id, "policy:weights")


def weights_channel(run_id: str) -> str:
    """Pub/sub channel: a JSON notice ``{"version", "path"}`` per published weights file."""
    return _run(run_id, "policy:notify")


def metrics_stream(run_id: str) -> str:
    """Stream: one entry of learner/worker metrics per step (bounded with MAXLEN ~ by its writer)."""
    return _run(run_id, "metrics")


def prompt_cursor(run_id: str) -> str:
    """String (int): how many prompt sequence numbers were handed out (INCR gives the next)."""
    return _run(run_id, "prompts:cursor")


def prompt_leases(run_id: str) -> str:
    """Sorted set: prompt sequence number -> lease expiry (ms, Redis clock) of prompts being worked on."""
    return _run(run_id, "prompts:leases")


def prompt_fence_prefix(run_id: str) -> str:
    """Prefix of the per-prompt fence keys (the lease scripts append the prompt number)."""
    return _run(run_id, "prompts:fence:")


def prompt_fence(run_id: str, prompt_id: int) -> str:
    """String (int): the lease epoch of a leased prompt, the fencing token its holder must present.

    One key per leased prompt (deleted on publish) so that a publisher can WATCH just its own.
    """
    return f"{prompt_fence_prefix(run_id)}{int(prompt_id)}"


def producer_counters(run_id: str) -> str:
    """Hash: ``accepted_groups`` (prompt groups published) and ``duplicates`` (idempotent retries)."""
    return _run(run_id, "producer:counters")


def producer_dedup(run_id: str) -> str:
    """Sorted set: rollout id -> stream entry time (ms); makes a retried publish a no-op."""
    return _run(run_id, "producer:dedup")


def length_curriculum(run_id: str) -> str:
    """Hash: ``max_new_tokens`` (the response length limit in effect) and ``step`` (the learner step
    that set it), written by the learner's entropy-gated length curriculum (seed 003) and read by
    the rollout workers before each group. Absent: the curriculum's start length."""
    return _run(run_id, "sampling:length")


def run_keys(run_id: str) -> list[str]:
    """The fixed keys of a run (for deletion when the run is removed); fence keys of prompts still
    leased are found with ``SCAN MATCH prompt_fence_prefix(run_id) + '*'``."""
    return [
        run_spec(run_id),
        rollout_stream(run_id),
        dead_letter_stream(run_id),
        learner_counters(run_id),
        policy_version(run_id),
        policy_weights(run_id),
        metrics_stream(run_id),
        prompt_cursor(run_id),
        prompt_leases(run_id),
        producer_counters(run_id),
        producer_dedup(run_id),
        length_curriculum(run_id),
    ]
