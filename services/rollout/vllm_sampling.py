"""The ``vllm`` sampler (GPU): K responses per prompt from vLLM, recorded as ``Sample``s like ``sample()``.

Selected with ``python -m services.rollout --sampler vllm``; needs the ``gpu`` extra
(``pip install '.[gpu]'``) and vLLM >= 0.10.2. vLLM is imported lazily: this module loads (and its
conversion code is tested) on machines without it.

What is recorded, and why it matches the ``hf`` sampler:

- ``SamplingParams(n=K, temperature=T, max_tokens=..., logprobs=record_top_k, seed=...)`` returns, per
  generated position, ``{token_id: Logprob(logprob, rank, ...)}`` holding the ``record_top_k`` best
  ids (ranks 1..k) plus the sampled id. By default (``logprobs_mode="raw_logprobs"``) vLLM computes
  these from the *raw* logits, i.e. at temperature 1 whatever T is. The engine here is built with
  ``logprobs_mode="processed_logprobs"``: log-probs after temperature scaling (and after top-k/top-p,
  which this sampler leaves off), i.e. ``log_softmax(z / T)``, the behaviour policy π_old that
  actually sampled, as ``sample()`` records. Temperature does not change the order of the ids, so
  the top-K ids are those of the raw logits, as in ``sample()``.
- ``generation_config="vllm"``: the checkpoint's generation defaults (top_k, top_p, penalties)
  are ignored, so nothing but T shapes the distribution.
- Seeds: prompt i of a call gets ``seed + i*K``; vLLM gives the K children of a request
  ``seed + j``, so every response of a call has its own random stream.

Weight reload: the learner's safetensors file (Hugging Face parameter names) is read inside each
vLLM worker process by ``WeightReloadExtension`` (passed as ``LLM(worker_extension_cls=...)``,
called through ``LLM.collective_rpc``), which hands the tensors to the model's own
``load_weights``: the path vLLM's RLHF examples use, public since vLLM 0.8 and unchanged in the
V1 engine. Weights are copied in place, so CUDA graphs stay valid; the prefix cache is reset after
a reload, since its KV entries were computed with the old weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
from packaging.version import InvalidVersion, Version

from services.rollout.sampling import Sample, SamplingConfig

log = logging.getLogger(__name__)

MIN_VLLM = "0.10.2"  # first release with LLM(logprobs_mode=...); collective_rpc and extensions are older
_EXTENSION = "services.rollout.vllm_sampling.WeightReloadExtension"
_RELOAD_METHOD = "distill_load_safetensors"
_DTYPES = ("auto", "float32", "float", "bfloat16", "float16", "half")  # what vLLM's dtype accepts


class VllmSamplerError(RuntimeError):
    """vLLM is missing, too old, or returned something this sampler cannot record."""


@dataclass
class VllmSamplerConfig:
    dtype: str = "auto"  # vLLM's dtype; "auto" may downcast a float32 checkpoint, "float32" matches hf
    enforce_eager: bool = False  # True: no CUDA graphs (faster start, slower decode)
    gpu_memory_utilization: float = 0.5  # share of the GPU for weights + KV cache (the learner may share it)
    max_logprobs: int = 64  # vLLM's cap on SamplingParams.logprobs; record_top_k may not exceed it
    max_model_len: int | None = None  # prompt + response tokens; None: the model's own limit
    seed: int = 0  # engine seed (per-request seeds come from the worker)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} is outside (0, 1]")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs: {self.max_logprobs} is negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: {self.max_model_len} leaves no room for a response")


def check_vllm_version(version: str) -> None:
    """Raise ``VllmSamplerError`` naming ``version`` unless it is at least ``MIN_VLLM``."""
    try:
        ok = Version(version) >= Version(MIN_VLLM)
    except InvalidVersion as err:
        raise VllmSamplerError(f"vLLM version {version!r} cannot be parsed; need >= {MIN_VLLM}") from err
    if not ok:
        raise VllmSamplerError(
            f"vLLM {version}: the vllm sampler needs vLLM >= {MIN_VLLM} "
            "(LLM(logprobs_mode='processed_logprobs'), LLM.collective_rpc, worker_extension_cls)"
        )


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise VllmSamplerError(
            "sampler=vllm: vLLM is not installed; install the gpu extra (pip install '.[gpu]') "
            "on a machine with a CUDA GPU, or use --sampler hf"
        ) from err
    check_vllm_version(str(vllm.__version__))
    return vllm


def load_vllm_sampler(model: str, cfg: VllmSamplerConfig) -> VllmSampler:
    """Start a vLLM engine on the student checkpoint ``model`` (blocking; minutes on a big model)."""
    vllm = _import_vllm()
    llm = vllm.LLM(
        model=model,
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_logprobs=cfg.max_logprobs,
        max_model_len=cfg.max_model_len,
        logprobs_mode="processed_logprobs",  # log-probs at the sampling temperature (module docstring)
        generation_config="vllm",  # ignore the checkpoint's sampling defaults
        worker_extension_cls=_EXTENSION,
        seed=cfg.seed,
    )
    vocab = int(llm.llm_engine.model_config.get_vocab_size())
    log.info("vLLM %s sampler on %s (vocab %d, dtype %s)", vllm.__version__, model, vocab, cfg.dtype)
    return VllmSampler(llm, vocab, cfg, str(vllm.__version__))


class VllmSampler:
    """One ``LLM.generate`` call per batch of prompts; the ``Sampler`` protocol of the rollout worker."""

    def __init__(self, llm: Any, vocab_size: int, cfg: VllmSamplerConfig, version: str) -> None:
        self.llm, self._vocab, self.cfg, self.version = llm, vocab_size, cfg, version

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def sample(self, prompts: list[list[int]], cfg: SamplingConfig, seed: int | None) -> list[Sample]:
        requests = request_kwargs(prompts, cfg, seed, self.cfg.max_logprobs)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            [SamplingParams(**kw) for kw in requests],
            use_tqdm=False,
        )
        return to_samples(outputs, prompts, cfg)

    def load_weights(self, path: str) -> None:
        file = Path(path)
        if not file.is_file():
            raise VllmSamplerError(f"weights: {path} is not a file")
        rpc = getattr(self.llm, "collective_rpc", None)
        if rpc is None:
            raise VllmSamplerError(
                f"vLLM {self.version}: LLM.collective_rpc is missing; "
                f"the vllm sampler needs vLLM >= {MIN_VLLM}"
            )
        try:
            loaded = rpc(_RELOAD_METHOD, args=(str(file.resolve()),))
        except Exception as err:  # raised in a vLLM worker process; re-raised here with what we know
            raise VllmSamplerError(
                f"vLLM {self.version}: reloading weights from {path} failed in the worker "
                f"({_EXTENSION}.{_RELOAD_METHOD}): {err}"
            ) from err
        if not loaded or any(int(n) <= 0 for n in loaded):
            raise VllmSamplerError(f"weights: {path}: a vLLM worker loaded no tensors ({loaded})")
        if self.llm.reset_prefix_cache() is False:  # old KV entries belong to the old weights
            raise VllmSamplerError("vLLM refused to reset its prefix cache after a weight reload")


def request_kwargs(
    prompts: Sequence[Sequence[int]], cfg: SamplingConfig, seed: int | None, max_logprobs: int
) -> list[dict[str, Any]]:
    """``SamplingParams`` keyword arguments, one dict per prompt; bad input raises ``ValueError``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0, got {cfg.temperature}")
    if cfg.responses_per_prompt < 1 or cfg.max_new_tokens < 1:
        raise ValueError("responses_per_prompt and max_new_tokens: must be at least 1")
    if not 0 <= cfg.record_top_k <= max_logprobs:
        raise ValueError(f"record_top_k: {cfg.record_top_k} is outside 0..{max_logprobs} (max_logprobs)")
    k = cfg.responses_per_prompt
    eos = cfg.eos_token_id
    return [
        {
            "n": k,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_new_tokens,
            "logprobs": cfg.record_top_k,  # 0 still returns the sampled token's log-prob
            "seed": None if seed is None else seed + i * k,
            "stop_token_ids": [eos] if eos is not None else None,
            "ignore_eos": eos is None,  # as the hf sampler: no EOS given, every response is max length
            "detokenize": False,  # the worker decodes what it needs
        }
        for i in range(len(prompts))
    ]


def to_samples(outputs: Sequence[Any], prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> list[Sample]:
    """vLLM ``RequestOutput``s (one per prompt, in prompt order) as ``Sample``s, grouped like ``sample()``."""
    if len(outputs) != len(prompts):
        raise VllmSamplerError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    samples = []
    for prompt_index, (out, prompt) in enumerate(zip(outputs, prompts, strict=True)):
        if list(out.prompt_token_ids) != list(prompt):
            raise VllmSamplerError(f"vLLM output {prompt_index} answers another prompt")
        completions = sorted(out.outputs, key=lambda c: int(c.index))
        if [int(c.index) for c in completions] != list(range(cfg.responses_per_prompt)):
            raise VllmSamplerError(
                f"prompt {prompt_index}: expected completions 0..{cfg.responses_per_prompt - 1}, "
                f"got {[c.index for c in completions]}"
            )
        samples += [_sample(prompt_index, list(prompt), c, cfg) for c in completions]
    return samples


def _sample(prompt_index: int, prompt: list[int], completion: Any, cfg: SamplingConfig) -> Sample:
    ids = [int(t) for t in completion.token_ids]
    if cfg.eos_token_id is not None and cfg.eos_token_id in ids:  # keep the EOS, drop anything after it
        ids = ids[: ids.index(cfg.eos_token_id) + 1]
    steps = completion.logprobs
    if steps is None or len(steps) < len(ids):
        raise VllmSamplerError(f"prompt {prompt_index}: logprobs missing for some generated positions")
    k = cfg.record_top_k
    behaviour = np.empty((len(ids),), np.float32)  # (T,)
    top_ids = np.zeros((len(ids), k), np.int32)  # (T, k)
    for t, token in enumerate(ids):
        entries: Mapping[int, Any] = steps[t]
        if token not in entries:
            raise VllmSamplerError(f"prompt {prompt_index}, position {t}: no log-prob for sampled id {token}")
        behaviour[t] = entries[token].logprob
        top_ids[t] = _top_ids(entries, k, prompt_index, t)
    if not np.isfinite(behaviour).all():
        raise VllmSamplerError(f"prompt {prompt_index}: non-finite behaviour log-probs from vLLM")
    return Sample(
        prompt_index=prompt_index,
        group_index=int(completion.index),
        prompt_ids=prompt,
        response_ids=ids,
        behaviour_logprobs=behaviour,
        top_k_ids=top_ids,
    )


def _top_ids(entries: Mapping[int, Any], k: int, prompt_index: int, t: int) -> list[int]:
    """The k best ids by vLLM's rank (1 = most likely); the sampled id is in ``entries`` only by rank."""
    if k == 0:
        return []
    ranked = sorted((int(lp.rank), int(tid)) for tid, lp in entries.items() if lp.rank is not None)
    best = [tid for rank, tid in ranked if rank <= k][:k]
    if len(best) < k:
        raise VllmSamplerError(
            f"prompt {prompt_index}, position {t}: vLLM returned {len(best)} ranked ids, record_top_k={k}"
        )
    return best


class WeightReloadExtension:
    """Mixed into every vLLM GPU worker (``LLM(worker_extension_cls=...)``); runs in the worker process.

    ``LLM.collective_rpc("distill_load_safetensors", args=(path,))`` calls it on each worker.
    """

    model_runner: Any  # set by vLLM's worker

    def distill_load_safetensors(self, path: str) -> int:
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        state = safetensors.torch.load_file(path)
        loaded = model.load_weights(weights=state.items())
        # Like the hf sampler's strict load_state_dict: a partial file would mix two policy versions.
        if isinstance(loaded, set):
            missing = sorted({name for name, _ in model.named_parameters()} - loaded)
            if missing:
                raise ValueError(f"weights: {path} lacks {len(missing)} parameters, e.g. {missing[:3]}")
        return len(state)
