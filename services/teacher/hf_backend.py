"""The ``hf`` backend: a transformers causal LM with an exact log-softmax over the full vocabulary.

Rows of a batch are left-padded with explicit position ids (so a padded row computes what it
would alone) and only the logits of response positions are kept. A batch holding several
responses to one prompt (the rollout worker's K per prompt) computes each distinct prompt once
when the model is of the Llama family (``services.rollout.shared_prompt``). The log-softmax runs in
float32 whatever the model dtype (bf16 on GPU by default), so any candidate id can be scored.
Used by the server (``--backend hf``) and in-process by tests and ``benchmarks/bench_teacher.py``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.rollout import cached_decoder, shared_prompt
from services.teacher.backend import Work
from services.teacher.domain import ItemScores, ScoreItem, ScoreParams, TeacherInfo
from services.teacher.fingerprint import fingerprint

log = logging.getLogger(__name__)


@dataclass
class HFConfig:
    model: str  # local path, or a hub name where the machine is online
    tokenizer: str | None = None  # defaults to ``model``
    model_name: str | None = None  # reported by Info; defaults to the last part of ``model``
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu; or float32/bfloat16/float16
    # Padded tokens per forward pass; the kept logits of a batch take up to this × vocab floats.
    max_batch_tokens: int = 8192
    max_top_k: int = 256  # largest top_k a request may ask for
    max_length: int | None = None  # caps the model's own maximum sequence length
    trust_remote_code: bool = False


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_hf(cfg: HFConfig) -> HFScorer:
    """Load model and tokenizer (blocking; run it in a thread) and describe them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _resolve_device(cfg.device)
    dtype = _resolve_dtype(cfg.dtype, device)
    log.info("loading %s on %s as %s", cfg.model, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code
    )
    model: Any = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code
    )
    model = model.to(device).eval()
    model_max = getattr(model.config, "max_position_embeddings", None)
    limits = [m for m in (model_max, cfg.max_length) if m]
    if not limits:
        raise ValueError("the model declares no max_position_embeddings: pass max_length")
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    info = TeacherInfo(
        model_name=cfg.model_name or Path(cfg.model.rstrip("/")).name,
        vocab_size=vocab_size,
        tokenizer_fingerprint=fingerprint(tokenizer),
        max_sequence_length=int(min(limits)),
        backend="hf",
        candidate_scoring=True,
        temperature_scaling=True,
        max_top_k=min(cfg.max_top_k, vocab_size),
        max_batch_tokens=cfg.max_batch_tokens,
    )
    return HFScorer(model, info)


class HFScorer:
    """Scores batches of (item, params) with one forward pass (``Scorer`` protocol)."""

    def __init__(self, model: Any, info: TeacherInfo) -> None:
        self.model = model
        self._info = info
        self.device = next(model.parameters()).device
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._can_share_prompts = cached_decoder.supports(model)

    @property
    def info(self) -> TeacherInfo:
        return self._info

    @torch.inference_mode()
    def score_batch(self, work: Sequence[Work]) -> list[ItemScores]:
        items = [w[0] for w in work]
        # K responses to a prompt (the rollout worker's groups): the prompt is computed once
        shared = self._can_share_prompts and _repeats_a_prompt(items)
        logits = self._shared_prompt_logits(items) if shared else self._padded_logits(items)
        return [score_positions(x, it, params) for x, (it, params) in zip(logits, work, strict=True)]

    def _padded_logits(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """Per item, the logits (P, V) predicting its response tokens, from one left-padded pass."""
        longest = max(int(it.token_ids.shape[0]) for it in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = int(it.token_ids.shape[0])
            ids[row, longest - n :] = torch.from_numpy(it.token_ids.astype(np.int64))
            mask[row, longest - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from 0 at its first token
        # The last column predicts past the end; keeping it makes row slicing uniform.
        keep = max(it.num_positions for it in items) + 1
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
            **kwargs,
        )
        logits = out.logits[:, -keep:]  # (B, keep, V)
        return [logits[row, keep - 1 - it.num_positions : keep - 1] for row, it in enumerate(items)]

    def _shared_prompt_logits(self, items: Sequence[ScoreItem]) -> list[torch.Tensor]:
        """The same logits, each distinct prompt computed once (services.rollout.shared_prompt)."""
        longest = max(int(it.token_ids.shape[0]) for it in items)
        ids = torch.zeros((len(items), longest), dtype=torch.long)  # (B, L) right-padded
        for row, it in enumerate(items):
            ids[row, : it.token_ids.shape[0]] = torch.from_numpy(it.token_ids.astype(np.int64))
        starts = torch.tensor([it.response_start for it in items])
        lengths = torch.tensor([it.num_positions for it in items])
        logits = shared_prompt.response_logits(self.model, ids, starts, lengths)  # (B, T, V)
        return [logits[row, : it.num_positions] for row, it in enumerate(items)]


def _repeats_a_prompt(items: Sequence[ScoreItem]) -> bool:
    return len({it.token_ids[: it.response_start].tobytes() for it in items}) < len(items)


def score_positions(logits: torch.Tensor, item: ScoreItem, params: ScoreParams) -> ItemScores:
    """Scores from the logits that predict each response token. ``logits``: (P, V), any dtype."""
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)  # (P, V) float32
    targets = torch.from_numpy(item.token_ids[item.response_start :].astype(np.int64)).to(logp.device)
    token_lp = logp.gather(1, targets[:, None])[:, 0]  # (P,)
    p = logp.shape[0]
    if params.top_k:
        top_lp, top_ids = logp.topk(params.top_k, dim=-1)  # (P, K), sorted best first
        # 1 - Σ top-K p, as -expm1(log Σ) to keep precision when the top-K holds almost all mass.
        outside = (-torch.expm1(torch.logsumexp(top_lp, dim=-1))).clamp(min=0.0)
    else:
        top_lp = logp.new_zeros((p, 0))
        top_ids = torch.zeros((p, 0), dtype=torch.long)
        outside = logp.new_ones((p,))
    if item.candidate_ids.shape[1]:
        cands = torch.from_numpy(item.candidate_ids.astype(np.int64)).to(logp.device)
        cand_lp = logp.gather(1, cands)  # (P, C)
    else:
        cand_lp = logp.new_zeros((p, 0))
    return ItemScores(
        token_logprobs=token_lp.cpu().numpy(),
        top_ids=top_ids.cpu().numpy().astype(np.int32),
        top_logprobs=top_lp.cpu().numpy(),
        candidate_logprobs=cand_lp.cpu().numpy(),
        outside_mass=outside.cpu().numpy(),
    )
