"""Turn decoded rollouts into the tensors of one learner step.

``pack_sequences`` right-pads prompt+response ids for the student forward pass;
``response_logits`` cuts its logits at the positions that predict response tokens;
``objective_batch`` lines those up with the teachers' scores and the rewards as
:class:`learner.objective.ObjectiveBatch` expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from contracts.rollout_record import DecodedRollout
from learner.objective import ObjectiveBatch
from proto.distill.v1 import reward_pb2


class BatchError(ValueError):
    """Rollouts that cannot form a batch under the run's spec; the message names the field."""


@dataclass
class Packed:
    input_ids: Tensor  # (B, L) int64, right-padded
    attention_mask: Tensor  # (B, L) int64
    starts: Tensor  # (B,) first response position
    lengths: Tensor  # (B,) response lengths P_b
    width: int  # T = max P_b


def check_vocab(rollout: DecodedRollout, vocab: int) -> None:
    """Every id of the record indexes the student's vocabulary; BatchError names the field if not.

    The record's decoder cannot know the vocabulary, so a record of another tokenizer is caught
    here, before it can index out of bounds inside the forward pass or a kernel.
    """
    arrays = [("token_ids", rollout.token_ids), ("student_top_ids", rollout.student_top_ids)]
    arrays += [(f"teachers[{i}].top_ids", t.top_ids) for i, t in enumerate(rollout.teachers)]
    for name, ids in arrays:
        if ids.size and int(ids.max()) >= vocab:
            raise BatchError(f"{name}: id {int(ids.max())} is outside the student's vocabulary of {vocab}")


def pack_sequences(rollouts: Sequence[DecodedRollout], pad_id: int = 0) -> Packed:
    if not rollouts:
        raise BatchError("rollouts: a batch needs at least one rollout")
    seq_len = max(len(r.token_ids) for r in rollouts)
    ids = torch.full((len(rollouts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rollouts):
        ids[b, : len(r.token_ids)] = torch.from_numpy(r.token_ids.astype(np.int64))
        mask[b, : len(r.token_ids)] = 1
    starts = torch.tensor([r.response_start for r in rollouts])
    lengths = torch.tensor([r.num_positions for r in rollouts])
    return Packed(ids, mask, starts, lengths, int(lengths.max()))


def _response_positions(packed: Packed) -> tuple[Tensor, Tensor]:
    """The position predicting each response token (B, T), and which of them are real (B, T)."""
    offsets = torch.arange(packed.width)
    mask = offsets[None, :] < packed.lengths[:, None]
    # position s-1+t predicts token s+t; padding positions read index 0 and are masked out
    return torch.where(mask, packed.starts[:, None] - 1 + offsets[None, :], 0), mask


def response_tokens(packed: Packed) -> tuple[Tensor, Tensor]:
    """Each row's response tokens (B, T), 0 past its length, and the mask of real ones (B, T)."""
    pos, mask = _response_positions(packed)
    rows = torch.arange(packed.input_ids.shape[0])[:, None]
    return torch.where(mask, packed.input_ids[rows, pos + 1], 0), mask


def response_logits(logits: Tensor, packed: Packed) -> Tensor:
    """The logits (B, T, V) predicting each response token, out of a forward pass's (B, L, V)."""
    pos, _ = _response_positions(packed)
    return logits[torch.arange(logits.shape[0])[:, None], pos]


def _pad(arrays: list[np.ndarray], width: int, fill: float) -> Tensor:
    """Stack per-response arrays (P_b, ...) into (B, width, ...) padded with ``fill``."""
    tail = arrays[0].shape[1:]
    out = np.full((len(arrays), width, *tail), fill, dtype=arrays[0].dtype)
    for b, a in enumerate(arrays):
        out[b, : a.shape[0]] = a
    return torch.from_numpy(out)


def _teacher_arrays(rollouts: Sequence[DecodedRollout], teachers: Sequence[str]) -> list[list]:
    by_name = []
    for b, r in enumerate(rollouts):
        have = {t.teacher: t for t in r.teachers}
        missing = [name for name in teachers if name not in have]
        if missing:
            raise BatchError(f"rollouts[{b}].teachers: no scores from {missing}")
        by_name.append([have[name] for name in teachers])
    return by_name


def _stack_teachers(arrays: list[list[np.ndarray]], width: int) -> Tensor:
    """(M, B, T, ...) from per-teacher lists of per-response arrays."""
    return torch.stack([_pad(per_teacher, width, 0.0) for per_teacher in arrays]).float()


# Absorbs the float32 rounding of the teachers' log-probs in the top-p cumulative sums.
NUCLEUS_SLACK = 1e-6


def teacher_nucleus(ids: Tensor, logprobs: Tensor, top_p: float) -> Tensor:
    """``ids`` (..., K) with those outside the teacher's top-p set made padding (−1).

    Seed 004, Definition 1 (eq. 7): the smallest set of the highest-probability tokens whose
    cumulative probability is >= top_p. An entry is kept when the mass ranked above it is still
    < top_p; ties are ranked in list order. K caps the set: when the K tokens hold less than
    top_p all K are kept, and top_p = 1 keeps all K.
    """
    if top_p >= 1.0:
        return ids
    lp = torch.where(ids >= 0, logprobs.double(), float("-inf"))
    order = lp.argsort(dim=-1, descending=True, stable=True)
    mass = lp.gather(-1, order).exp()
    above = torch.nn.functional.pad(mass.cumsum(-1)[..., :-1], (1, 0))  # exclusive cumulative sum
    keep = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, above < top_p - NUCLEUS_SLACK)
    return torch.where(keep & (ids >= 0), ids, -1)


def mean_support_size(batch: ObjectiveBatch) -> float:
    """Mean number of support ids per response token (the full vocabulary without ids)."""
    if batch.support_ids is None:
        return float(batch.logits.shape[-1])
    sizes = (batch.support_ids >= 0).sum(-1)[batch.mask]
    return float(sizes.double().mean()) if sizes.numel() else 0.0


def teacher_tops(
    rollouts: Sequence[DecodedRollout], teachers: Sequence[str], width: int
) -> tuple[Tensor, Tensor]:
    """Each teacher's top-K ids (M, B, T, K) (−1 = padding) and log-probs, for SelecTKD's greedy_top_k."""
    scores = _teacher_arrays(rollouts, teachers)
    per_teacher = [[s[m] for s in scores] for m in range(len(teachers))]
    ids = torch.stack([_pad([x.top_ids for x in xs], width, -1).long() for xs in per_teacher])
    return ids, _stack_teachers([[x.top_logprobs for x in xs] for xs in per_teacher], width)


def support(
    rollouts: Sequence[DecodedRollout], teachers: Sequence[str], kind: str, width: int, vocab: int,
    top_p: float = 1.0,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Support ids (B, T, K) and teacher log-probs on them (M, B, T, K|V) for the run's support
    (``top_p``: the nucleus of ``teacher_top_p``)."""
    if not teachers:
        return None, None
    scores = _teacher_arrays(rollouts, teachers)
    candidates = [[s[m].candidate_logprobs for s in scores] for m in range(len(teachers))]
    if kind == "full":
        if candidates[0][0].shape[1] != vocab:
            raise BatchError(f"teachers.candidate_logprobs: full support needs {vocab} per position")
        return None, _stack_teachers(candidates, width)
    student_ids = _pad([r.student_top_ids for r in rollouts], width, -1).long()
    if kind == "student_top_k":
        return student_ids, _stack_teachers(candidates, width)
    if len(teachers) != 1:
        raise BatchError(
            f"objective.support: {kind!r} needs exactly one teacher, the run has {len(teachers)}"
        )
    top_ids = _pad([s[0].top_ids for s in scores], width, -1).long()
    top_lp = _stack_teachers([[s[0].top_logprobs for s in scores]], width)
    if kind == "teacher_top_k":
        return top_ids, top_lp
    if kind == "teacher_top_p":
        return teacher_nucleus(top_ids, top_lp[0], top_p), top_lp
    # union: the student's top-K (scored as candidates), then the teacher's top-K ids not among them
    dup = (top_ids[..., :, None] == student_ids[..., None, :]).any(-1)
    ids = torch.cat([student_ids, torch.where(dup, -1, top_ids)], -1)
    return ids, torch.cat([_stack_teachers(candidates, width), top_lp], -1)


def rewards_matrix(rollouts: Sequence[DecodedRollout], names: Sequence[str],
                   failure_values: Sequence[float | None]) -> tuple[Tensor, list[int]]:  # fmt: skip
    """(B, N) rewards and the indices of rollouts whose failed reward has no failure value."""
    out = torch.zeros((len(rollouts), len(names)))
    failed = []
    for b, r in enumerate(rollouts):
        have = {x.name: x for x in r.rewards}
        for n, (name, fallback) in enumerate(zip(names, failure_values, strict=True)):
            x = have.get(name)
            if x is not None and x.status == reward_pb2.REWARD_STATUS_OK:
                out[b, n] = x.value
            elif fallback is not None:
                out[b, n] = fallback
            else:
                failed.append(b)
    return out, sorted(set(failed))


def objective_batch(
    logits: Tensor,
    packed: Packed,
    rollouts: Sequence[DecodedRollout],
    teachers: Sequence[str],
    support_kind: str,
    rewards: Tensor,
    *,
    top_p: float = 1.0,
    with_teacher_tops: bool = False,
) -> ObjectiveBatch:
    """Everything :func:`learner.objective.objective_loss` needs, from the student's logits that
    predict each response token (B, T, V): :func:`response_logits` of a forward pass, or
    ``services.rollout.shared_prompt.response_logits``.

    ``top_p``: the nucleus of the ``teacher_top_p`` support; ``with_teacher_tops``: also each
    teacher's top-K list (SelecTKD's greedy_top_k on a top-K support)."""
    tokens, mask = response_tokens(packed)
    width, vocab = packed.width, logits.shape[-1]
    scores = _teacher_arrays(rollouts, teachers)
    token_lp = [[s[m].token_logprobs for s in scores] for m in range(len(teachers))]
    teacher_tok = _stack_teachers(token_lp, width) if teachers else torch.zeros((0, len(rollouts), width))
    ids, teacher_lp = support(rollouts, teachers, support_kind, width, vocab, top_p)
    tops = teacher_tops(rollouts, teachers, width) if with_teacher_tops and teachers else (None, None)
    groups: dict[tuple[int, int], int] = {}
    group_ids = torch.tensor([groups.setdefault((r.prompt_id, r.attempt), len(groups)) for r in rollouts])
    return ObjectiveBatch(
        logits=logits,
        tokens=tokens,
        mask=mask,
        teacher_token_logprobs=teacher_tok,
        teacher_logprobs=teacher_lp,
        support_ids=ids,
        rewards=rewards,
        group_ids=group_ids,
        teacher_top_ids=tops[0],
        teacher_top_logprobs=tops[1],
        # reference responses (sampling.on_policy_fraction) stay out of the sparse term
        on_policy=torch.tensor([not r.from_reference for r in rollouts], dtype=torch.bool),
    )
