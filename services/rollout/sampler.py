"""The rollout worker's view of a sampler, and the ``hf`` one (a transformers model, any device).

The worker talks to a ``Sampler`` only, so ``--sampler hf`` (the default) and ``--sampler vllm``
(services.rollout.vllm_sampling, GPU) are interchangeable: both return the same ``Sample`` records
and both reload the learner's published safetensors file in place. ``make_sampler`` picks one by
name; an unknown name raises an error that lists the valid ones.
"""

from __future__ import annotations

from typing import Protocol

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.rollout.cached_decoder import CachedDecoder, supports
from services.rollout.sampling import Sample, SamplingConfig, sample
from services.rollout.vllm_sampling import VllmSamplerConfig, load_vllm_sampler

SAMPLERS = ("hf", "vllm")


class Sampler(Protocol):
    @property
    def vocab_size(self) -> int:
        """Rows of the student's output layer (ids a full-vocabulary support covers)."""
        ...

    def sample(self, prompts: list[list[int]], cfg: SamplingConfig, seed: int | None) -> list[Sample]:
        """K responses per prompt, grouped prompt by prompt (blocking; run it in a thread)."""
        ...

    def load_weights(self, path: str) -> None:
        """Replace the student's weights with the learner's safetensors file (blocking)."""
        ...


class HfSampler:
    """The student as a transformers model; sampling is ``services.rollout.sampling.sample``, through
    the KV-cached decoder (services.rollout.cached_decoder) for the architectures it supports."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.decoder = CachedDecoder(model) if supports(model) else None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def sample(self, prompts: list[list[int]], cfg: SamplingConfig, seed: int | None) -> list[Sample]:
        return sample(self.model, prompts, cfg, seed, self.decoder)

    def load_weights(self, path: str) -> None:
        self.model.load_state_dict(safetensors.torch.load_file(path))
        if self.decoder is not None:  # its fused matrices are copies of the old weights
            self.decoder = CachedDecoder(self.model)


def make_sampler(
    kind: str, student: str, device: str = "cpu", vllm: VllmSamplerConfig | None = None
) -> Sampler:
    """Load the student (a local path or hub name) into the sampler ``kind`` names (blocking).

    ``device`` places the hf sampler's model; vLLM places its model itself.
    """
    if kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        model = model.to(device)  # type: ignore[arg-type]
        return HfSampler(model.eval())
    if kind == "vllm":
        return load_vllm_sampler(student, vllm or VllmSamplerConfig())
    raise ValueError(f"sampler: unknown {kind!r}; valid: {', '.join(SAMPLERS)}")
