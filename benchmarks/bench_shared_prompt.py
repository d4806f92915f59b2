"""Each prompt once (services.rollout.shared_prompt) against the model's own forward pass over
prompt + response rows, measured in the same run: the learner's forward + backward, and the
teacher's forward alone (inference mode, as the hf backend scores).

Builds a random Llama offline (no hub) and packs a step's rows as the learner does:
``--prompts`` prompts of ``--prompt-len`` tokens, ``--k`` responses to each of random lengths in
[1, ``--max-response``]. Times forward, a loss over the response logits, and backward (and the
forward alone), the two ways interleaved, and prints the median of each and their ratio. The
defaults are the demo's student and batch (4 layers × 48, 8 prompts of 18 tokens, 4 responses
of up to 12; 1024 ids instead of its 18).

Run: ``python -m benchmarks.bench_shared_prompt [--hidden 256 --prompt-len 128 --max-response 256]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from contracts.rollout_record import DecodedRollout
from learner.batching import Packed, pack_sequences, response_logits
from services.rollout import shared_prompt
from services.teacher.tiny_model import TinySpec, build_tiny_model


def _rows(a: argparse.Namespace, vocab: int) -> list[DecodedRollout]:
    """``a.prompts`` × ``a.k`` rows; only the ids and the response start matter to packing."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(a.prompts):
        prompt = rng.integers(3, vocab, a.prompt_len)
        for _ in range(a.k):
            response = rng.integers(3, vocab, int(rng.integers(1, a.max_response + 1)))
            rows.append(DecodedRollout(
                rollout_id="", run_id="", prompt_id=0, group_index=0, group_size=a.k, attempt=1,
                dataset_index=0, policy_version=0, token_ids=np.concatenate([prompt, response]),
                response_start=a.prompt_len, sampled_logprobs=np.zeros(0, np.float32),
                student_top_ids=np.zeros((len(response), 0), np.int32),
            ))  # fmt: skip
    return rows


def _logits(model: PreTrainedModel, packed: Packed, shared: bool) -> torch.Tensor:
    if shared:
        return shared_prompt.response_logits(model, packed.input_ids, packed.starts, packed.lengths)
    out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    return response_logits(out, packed)


def _step(model: PreTrainedModel, packed: Packed, shared: bool) -> None:
    model.zero_grad(set_to_none=True)
    mask = torch.arange(packed.width)[None, :] < packed.lengths[:, None]
    _logits(model, packed, shared).float().log_softmax(-1)[mask].mean().backward()


@torch.inference_mode()
def _score(model: PreTrainedModel, packed: Packed, shared: bool) -> None:
    _logits(model, packed, shared).float().log_softmax(-1)


def _median_ms(fns: Mapping[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved, so that a slower minute of the machine hits both
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=4, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=18)
    p.add_argument("--max-response", type=int, default=12)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(
            vocab_size=1024, hidden_size=a.hidden, num_layers=a.layers, num_heads=4, max_length=1024
        )
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(Path(tmp) / "m", spec)).train()
    packed = pack_sequences(_rows(a, 1024))
    tokens = int(packed.attention_mask.sum())
    print(f"{a.prompts} prompts x {a.k} responses, {tokens} tokens, hidden {a.hidden} x {a.layers} layers, "
          f"torch threads {torch.get_num_threads()}, median of {a.repeats}")  # fmt: skip
    for what, run in (("forward + backward (learner)", _step), ("forward, inference (teacher)", _score)):
        fns = {"model's forward": partial(run, model, packed, False),
               "shared prompt": partial(run, model, packed, True)}  # fmt: skip
        _median_ms(fns, 5)  # warm-up
        ms = _median_ms(fns, a.repeats)
        for name, t in ms.items():
            print(f"  {what}: {name:<16} {t:7.2f} ms")
        ratio = ms["shared prompt"] / ms["model's forward"]
        print(f"  {what}: shared prompt / model's forward: {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
