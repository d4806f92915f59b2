"""Logits of responses that share prompts, computing each distinct prompt once.

A step trains on K responses to each prompt (``sampling.responses_per_prompt``), and a teacher
scores those K responses; a plain forward pass over prompt + response rows runs every prompt K
times. Here each distinct prompt runs once, the responses attend to its keys and values, and its
last position predicts the first token of every response to it. The logits are the model's own;
under autograd the gradient reaching a shared prompt is the sum over its responses (autograd adds
up the rows that index it). It saves the work of (K - 1) / K of the prompt tokens: on the demo's
batches (8 prompts of 18 tokens, 4 responses of at most 12) the learner's forward + backward
takes 0.72x the time of the transformers pass; with 128-token prompts and responses at hidden
size 256, 0.58x; the teacher's forward alone, in inference mode, 0.72x on the demo's batches and
0.60x at hidden size 336, on one thread (``benchmarks/bench_shared_prompt.py``).

Llama-family models only (``services.rollout.cached_decoder.supports``), with the cached
decoder's layer arithmetic. Used by ``learner.train`` (the student; the model's own forward pass
for others and under DDP, whose gradient hooks need it) and by the teacher's hf backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from services.rollout.cached_decoder import CachedDecoder, causal_mask


@dataclass
class PromptGroups:
    """Prompt + response rows split into distinct prompts and responses."""

    prompts: Tensor  # (G, Wp) distinct prompts, left-padded
    prompt_mask: Tensor  # (G, Wp) bool, True on prompt tokens
    responses: Tensor  # (B, T) each response without its last token, right-padded; T = max(W - 1, 1)
    real: Tensor  # (B, T) bool, True on the response tokens
    group: Tensor  # (B,) the row's prompt in ``prompts``


def prompt_groups(ids: Tensor, starts: Tensor, lengths: Tensor) -> PromptGroups:
    """Rows with the same prompt tokens share one prompt row.

    ``ids`` (B, L): prompt + response rows, right-padded; row b's response starts at ``starts[b]``
    and has ``lengths[b]`` tokens (``learner.batching.Packed``'s fields)."""
    index: dict[tuple[int, ...], int] = {}
    group = []
    for row, start in zip(ids.tolist(), starts.tolist(), strict=True):
        group.append(index.setdefault(tuple(row[:start]), len(index)))
    width = max(len(p) for p in index)
    prompts = torch.zeros((len(index), width), dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.bool)
    for g, p in enumerate(index):
        prompts[g, width - len(p) :] = torch.tensor(p)
        mask[g, width - len(p) :] = True
    # response position t holds token start + t; the last token predicts nothing the loss uses
    # (one column at least, so that one-token responses keep the shapes simple)
    steps = torch.arange(max(int(lengths.max()) - 1, 1))[None, :]
    cols, inside = starts[:, None] + steps, steps < lengths[:, None] - 1
    rows = torch.arange(len(group))[:, None]
    responses = torch.where(inside, ids[rows, cols.clamp(max=ids.shape[1] - 1)], 0)
    return PromptGroups(prompts, mask, responses, inside, torch.tensor(group))


def _masks(g: PromptGroups) -> tuple[Tensor, Tensor]:
    """Which keys each query may attend to: prompts (G, 1, Wp, Wp) over themselves; responses
    (B, 1, T, Wp + T) over their prompt and their own earlier tokens."""
    wp, t = g.prompts.shape[1], g.responses.shape[1]
    of_prompt = g.prompt_mask[g.group][:, None, None, :].expand(-1, 1, t, wp)
    return causal_mask(g.prompt_mask), torch.cat([of_prompt, causal_mask(g.real)], -1)


def response_logits(model: PreTrainedModel, ids: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """Logits (B, T, V), T = max(lengths), predicting each response token of the rows that
    :func:`prompt_groups` reads, as ``learner.batching.response_logits`` reads them from the model's
    own forward pass (positions past a row's length are padding)."""
    d = CachedDecoder(model)  # built per call: its fused weights carry the gradient to the model
    device = d.embed.device
    g = prompt_groups(ids, starts, lengths)
    prompts, responses, group = g.prompts.to(device), g.responses.to(device), g.group.to(device)
    prompt_mask, response_mask = (m.to(device) for m in _masks(g))
    positions = (g.prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    after = g.prompt_mask.sum(-1)[g.group][:, None] + torch.arange(responses.shape[1])[None, :]
    rope_p = [x[:, None] for x in d.rotary(d.embed, positions.to(device))]
    rope_r = [x[:, None] for x in d.rotary(d.embed, after.to(device))]
    xp, xr = d.embed_ids(prompts), d.embed_ids(responses)
    for layer in d.layers:
        qp, kp, vp = d.qkv(layer, xp, *rope_p)
        qr, kr, vr = d.qkv(layer, xr, *rope_r)
        keys, values = torch.cat([kp[group], kr], 2), torch.cat([vp[group], vr], 2)
        xr = d.attend(layer, xr, qr, keys, values, response_mask)
        xp = d.attend(layer, xp, qp, kp, vp, prompt_mask)
    first = d.logits(xp[:, -1])[group]  # (B, V): each prompt's last position
    return torch.cat([first[:, None], d.logits(xr)], 1)[:, : int(lengths.max())]
