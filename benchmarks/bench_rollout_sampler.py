"""Rollout sampling throughput: the ``hf`` sampler's KV-cached decoder against transformers'
``generate``, and the ``vllm`` sampler against the ``hf`` one, measured in the same run.

Builds a random Llama offline (no hub), then for each sampler times ``sample()`` of ``--prompts``
prompts × ``--k`` responses of up to ``--new-tokens`` tokens (EOS off, so every response has full
length) and one weight reload from a safetensors file. Prints generated tokens/s and the ratios, and the
cached decoder's time with one prefill per prompt against one per response (K copies).
The hf sampler runs on CUDA when there is one, else on the CPU; the vllm sampler needs a
CUDA GPU and the ``gpu`` extra, and is reported as unavailable otherwise. ``--hidden 48 --layers 4
--new-tokens 12 --prompts 8`` is the demo's student and batch (with 1024 ids instead of its 18).

Run: ``python -m benchmarks.bench_rollout_sampler [--prompts 16] [--k 4] [--new-tokens 64]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from services.rollout.cached_decoder import CachedDecoder
from services.rollout.sampler import HfSampler, Sampler, make_sampler
from services.rollout.sampling import SamplingConfig
from services.rollout.vllm_sampling import VllmSamplerConfig, VllmSamplerError
from services.teacher.tiny_model import TinySpec, build_tiny_model


def _time(sampler: Sampler, prompts: list[list[int]], cfg: SamplingConfig, repeats: int) -> float:
    sampler.sample(prompts, cfg, 0)  # warm-up: kernels, CUDA graphs, allocator
    start = time.perf_counter()
    for i in range(repeats):
        sampler.sample(prompts, cfg, i + 1)
    return (time.perf_counter() - start) / repeats


def _prefill_ratio(
    decoder: CachedDecoder, prompts: list[list[int]], a: argparse.Namespace, device: str
) -> float:
    """Time of the decoder with one prefill per prompt (``repeats``) over its time with K copies of
    each prompt, interleaved call by call (the prompts have one length: no padding)."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    copies = ids.repeat_interleave(a.k, 0), mask.repeat_interleave(a.k, 0)
    runs = {
        "shared": lambda: decoder.generate(ids, mask, a.new_tokens, 1.0, None, 0, repeats=a.k),
        "copies": lambda: decoder.generate(*copies, a.new_tokens, 1.0, None, 0),
    }
    times: dict[str, float] = {name: 0.0 for name in runs}
    for _ in range(a.repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name] += time.perf_counter() - start
    return times["shared"] / times["copies"]


def _reload_s(sampler: Sampler, path: Path) -> float:
    start = time.perf_counter()
    sampler.load_weights(str(path))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(
            vocab_size=1024, hidden_size=a.hidden, num_layers=a.layers, num_heads=4, max_length=512
        )
        model_dir = build_tiny_model(Path(tmp) / "student", spec)
        cfg = SamplingConfig(a.k, 1.0, a.new_tokens, a.top_k, eos_token_id=None)
        prompts = [[2, *range(10 + i, 26 + i)] for i in range(a.prompts)]
        tokens = a.prompts * a.k * a.new_tokens
        hf = make_sampler("hf", str(model_dir), device)
        assert isinstance(hf, HfSampler)
        weights = Path(tmp) / "policy.safetensors"
        safetensors.torch.save_file(
            {k: v.contiguous().cpu() for k, v in hf.model.state_dict().items()}, weights
        )
        hf_s = _time(hf, prompts, cfg, a.repeats)
        print(
            f"hf   ({device}): {tokens / hf_s:10.0f} tokens/s  reload {_reload_s(hf, weights) * 1e3:7.1f} ms"
        )
        decoder, hf.decoder = hf.decoder, None  # the same sampler on transformers' generate
        generate_s = _time(hf, prompts, cfg, a.repeats)
        hf.decoder = decoder
        print(f"hf generate ({device}): {tokens / generate_s:10.0f} tokens/s")
        print(f"cached decoder / generate throughput ratio: {generate_s / hf_s:.2f}x")
        assert decoder is not None
        ratio = _prefill_ratio(decoder, prompts, a, device)
        print(f"cached decoder, one prefill per prompt / one per response: {ratio:.2f}x the time")
        del hf
        try:
            vllm = make_sampler("vllm", str(model_dir), vllm=VllmSamplerConfig(gpu_memory_utilization=0.3))
        except VllmSamplerError as err:
            print(f"vllm: not available here ({err})")
            return
        vllm_s = _time(vllm, prompts, cfg, a.repeats)
        reload = _reload_s(vllm, weights)
        print(f"vllm (cuda): {tokens / vllm_s:10.0f} tokens/s  reload {reload * 1e3:7.1f} ms")
        print(f"vllm/hf throughput ratio: {hf_s / vllm_s:.2f}x")


if __name__ == "__main__":
    main()
