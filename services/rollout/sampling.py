"""Sample K responses per prompt from the student and record what the learner needs of each step.

For every sampled response this keeps the response token ids, the behaviour log-prob of each
sampled token (at the sampling temperature) and the student's top-K ids at each position (the
dense support of seed 000, appendix B.2, when the run uses the student's top-K).

The rollout-side run options decide here, as pure functions: which prompts get the dataset's
reference response instead of samples (``from_reference``, with the share from
``contracts.runspec.on_policy_share``; GKD's λ, seed 002 chapter 4), which samples are flawed
(``perplexity``, ``split_flawed``; seed 002 chapter 7), and ``teacher_forced`` records a
reference response as the sampler records a sample.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel

from services.rollout.cached_decoder import CachedDecoder


@dataclass
class SamplingConfig:
    responses_per_prompt: int = 4  # K of Algorithm 1 (group size)
    temperature: float = 1.0  # sampling temperature; 1.0 samples from the policy itself
    max_new_tokens: int = 32  # response length limit
    record_top_k: int = 0  # how many student top-K ids to keep per position (0: none)
    eos_token_id: int | None = None  # a response ends after this token (kept in the response)
    pad_token_id: int = 0


@dataclass
class Sample:
    prompt_index: int  # which prompt of the batch this response answers
    group_index: int  # 0..K-1 among the responses to that prompt
    prompt_ids: list[int]
    response_ids: list[int]  # (T,)
    behaviour_logprobs: np.ndarray  # (T,) float32, log π_old(y_t) at the sampling temperature
    top_k_ids: np.ndarray  # (T, record_top_k) int32, the student's top-K ids at each position


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _response_length(tokens: torch.Tensor, eos: int | None) -> int:
    if eos is None:
        return int(tokens.numel())
    hits = (tokens == eos).nonzero()
    return int(hits[0, 0]) + 1 if hits.numel() else int(tokens.numel())


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    generator_seed: int | None = None,
    decoder: CachedDecoder | None = None,
) -> list[Sample]:
    """K responses for each prompt, grouped prompt by prompt; through ``decoder`` when given (the
    same model's fast path, services.rollout.cached_decoder), else transformers' ``generate``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, cfg.pad_token_id)
    if decoder is not None:
        new_tokens, logits = decoder.generate(
            ids.to(device), mask.to(device), cfg.max_new_tokens, cfg.temperature, cfg.eos_token_id,
            cfg.pad_token_id, repeats=cfg.responses_per_prompt,
        )  # fmt: skip
    else:
        new_tokens, logits = _generate(model, ids.to(device), mask.to(device), cfg)
    return _samples(prompts, new_tokens.cpu(), logits.float().cpu(), cfg)


def _generate(
    model: PreTrainedModel, ids: Tensor, mask: Tensor, cfg: SamplingConfig
) -> tuple[Tensor, Tensor]:
    """transformers' ``generate``: the new tokens (P*K, T) and the raw logits that predicted them."""
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.responses_per_prompt,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def _samples(
    prompts: list[list[int]], new_tokens: Tensor, logits: Tensor, cfg: SamplingConfig
) -> list[Sample]:
    """``Sample`` records from the new tokens (P*K, T) and their raw logits (P*K, T, V)."""
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1)
    sampled_lp = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    top_ids = logits.topk(cfg.record_top_k, dim=-1).indices if cfg.record_top_k else None
    samples = []
    for row in range(new_tokens.shape[0]):
        length = _response_length(new_tokens[row], cfg.eos_token_id)
        prompt_index, group_index = divmod(row, cfg.responses_per_prompt)
        k_ids = top_ids[row, :length] if top_ids is not None else torch.empty((length, 0))
        samples.append(
            Sample(
                prompt_index=prompt_index,
                group_index=group_index,
                prompt_ids=list(prompts[prompt_index]),
                response_ids=new_tokens[row, :length].tolist(),
                behaviour_logprobs=sampled_lp[row, :length].numpy().astype(np.float32),
                top_k_ids=k_ids.numpy().astype(np.int32),
            )
        )
    return samples


def from_reference(seed: int, prompt_id: int, attempt: int, share: float) -> bool:
    """Whether this prompt's group is the dataset's reference response (GKD's coin, seed 002 ch. 4,
    "with probability 1−λ, ... the ground-truth sequence from the dataset").

    The coin is a hash of (run seed, prompt, attempt), uniform in [0, 1): every worker, and a retry
    of the same lease, decides the same way; over many prompts the reference share is 1 − share.
    """
    digest = hashlib.blake2b(f"{seed}\x00{prompt_id}\x00{attempt}".encode(), digest_size=8).digest()
    coin = int.from_bytes(digest, "big") / 2.0**64
    return coin >= share


def perplexity(behaviour_logprobs: np.ndarray) -> float:
    """exp(mean −log π_old(y_t)) of one response under the student that sampled it (seed 002 ch. 7)."""
    if behaviour_logprobs.size == 0:
        return 1.0
    return math.exp(-float(np.mean(behaviour_logprobs, dtype=np.float64)))


def split_flawed(samples: Sequence[Sample], max_perplexity: float) -> tuple[list[Sample], list[Sample]]:
    """(coherent, flawed): a response whose perplexity exceeds ``max_perplexity`` is flawed."""
    kept: list[Sample] = []
    flawed: list[Sample] = []
    for s in samples:
        (kept if perplexity(s.behaviour_logprobs) <= max_perplexity else flawed).append(s)
    return kept, flawed


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel, prompt_ids: list[int], response_ids: list[int], cfg: SamplingConfig
) -> Sample:
    """A given response recorded as ``sample`` records a sampled one: log π(y_t) at the sampling
    temperature and the student's top-K ids at each position, from one forward pass."""
    if not prompt_ids or not response_ids:
        raise ValueError("teacher_forced: the prompt and the response need at least one token each")
    device = next(model.parameters()).device
    seq = torch.tensor([prompt_ids + response_ids], device=device)
    logits = model(input_ids=seq).logits[0, len(prompt_ids) - 1 : -1].float().cpu()  # (T, V)
    logprobs = torch.log_softmax(logits / cfg.temperature, dim=-1)
    tokens = torch.tensor(response_ids)
    top = logits.topk(cfg.record_top_k, dim=-1).indices if cfg.record_top_k else torch.empty((len(tokens), 0))
    return Sample(
        prompt_index=0,
        group_index=0,
        prompt_ids=list(prompt_ids),
        response_ids=list(response_ids),
        behaviour_logprobs=logprobs.gather(-1, tokens[:, None]).squeeze(-1).numpy().astype(np.float32),
        top_k_ids=top.numpy().astype(np.int32),
    )
