"""The ``vllm`` backend (GPU): top-K and actual-token log-probs from vLLM's prompt log-probs.

vLLM returns, per prompt position, a dict ``{token_id: Logprob(logprob, rank, ...)}`` holding the
top ``prompt_logprobs`` ids plus the actual token, computed from the raw logits. So this backend
cannot score arbitrary candidate ids nor apply a temperature; ``Info`` says so and such requests
get FAILED_PRECONDITION. vLLM is imported lazily: the module loads on machines without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.teacher.backend import Work
from services.teacher.domain import ItemScores, ScoreItem, TeacherInfo
from services.teacher.fingerprint import fingerprint

log = logging.getLogger(__name__)


@dataclass
class VLLMConfig:
    model: str  # local path, or a hub name where the machine is online
    tokenizer: str | None = None
    model_name: str | None = None
    dtype: str = "auto"  # vLLM's dtype argument ("auto" is bf16 for bf16 checkpoints)
    max_batch_tokens: int = 16384  # prompt tokens per generate() call
    max_top_k: int = 64  # becomes vLLM's max_logprobs
    max_length: int | None = None  # longest scored sequence; vLLM's max_model_len is one more
    gpu_memory_utilization: float = 0.85


def load_vllm(cfg: VLLMConfig) -> VLLMScorer:
    """Start the vLLM engine (blocking; run it in a thread)."""
    from vllm import LLM

    llm = LLM(
        model=cfg.model,
        tokenizer=cfg.tokenizer or cfg.model,
        dtype=cfg.dtype,
        max_model_len=cfg.max_length + 1 if cfg.max_length else None,  # + the 1 generated token
        max_logprobs=cfg.max_top_k,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enable_prefix_caching=False,  # cached prefixes would skip their prompt log-probs
    )
    model_config = llm.llm_engine.model_config
    info = TeacherInfo(
        model_name=cfg.model_name or Path(cfg.model.rstrip("/")).name,
        vocab_size=int(model_config.get_vocab_size()),
        tokenizer_fingerprint=fingerprint(llm.get_tokenizer()),
        max_sequence_length=int(model_config.max_model_len) - 1,  # room for the 1 generated token
        backend="vllm",
        candidate_scoring=False,
        temperature_scaling=False,
        max_top_k=cfg.max_top_k,
        max_batch_tokens=cfg.max_batch_tokens,
    )
    return VLLMScorer(llm, info)


class VLLMScorer:
    """One ``LLM.generate`` call per batch with ``max_tokens=1`` and ``prompt_logprobs=top_k``."""

    def __init__(self, llm: Any, info: TeacherInfo) -> None:
        self.llm, self._info = llm, info

    @property
    def info(self) -> TeacherInfo:
        return self._info

    def score_batch(self, work: Sequence[Work]) -> list[ItemScores]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in it.token_ids]) for it, _ in work]
        sampling = [SamplingParams(max_tokens=1, prompt_logprobs=params.top_k) for _, params in work]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [
            _scores(out.prompt_logprobs, it, params.top_k)
            for out, (it, params) in zip(outputs, work, strict=True)
        ]


def _scores(prompt_logprobs: Sequence[Any], item: ScoreItem, top_k: int) -> ItemScores:
    """Per response position: actual-token log-prob, top-K by rank, mass outside the top-K."""
    p = item.num_positions
    token_lp = np.empty((p,), np.float32)
    top_ids = np.zeros((p, top_k), np.int32)
    top_lp = np.full((p, top_k), -np.inf, np.float32)
    for row, pos in enumerate(range(item.response_start, int(item.token_ids.shape[0]))):
        entries = prompt_logprobs[pos]  # {token_id: Logprob}; the actual token is always present
        token_lp[row] = entries[int(item.token_ids[pos])].logprob
        ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entries.items() if lp.rank <= top_k))
        for col, (_, tid, lp) in enumerate(ranked[:top_k]):
            top_ids[row, col], top_lp[row, col] = tid, lp
    mass = np.array([math.fsum(math.exp(v) for v in r if v > -np.inf) for r in top_lp], np.float64)
    return ItemScores(
        token_logprobs=token_lp,
        top_ids=top_ids,
        top_logprobs=top_lp,
        candidate_logprobs=np.zeros((p, 0), np.float32),
        outside_mass=np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32),
    )
