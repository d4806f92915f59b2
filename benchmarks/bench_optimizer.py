"""The learner's optimizer step: AdamW fused (``learner.train.make_optimizer``) against the default
(one small op after another for each parameter tensor) and ``foreach``, measured in the same run.

Builds a random Llama offline (no hub) of the demo student's shape by default (4 layers × 48, 18 ids),
gives every parameter a random gradient, and times ``optimizer.step()`` the three ways,
interleaved; prints the median of each and its ratio to the default.

Run: ``python -m benchmarks.bench_optimizer [--hidden 256 --layers 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from services.teacher.tiny_model import TinySpec, build_tiny_model

VARIANTS: dict[str, dict[str, bool]] = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=48)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=18)
    p.add_argument("--repeats", type=int, default=200)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinySpec(a.vocab, a.hidden, a.layers, num_heads=4, max_length=64)
        path = build_tiny_model(Path(tmp) / "m", spec)
        models = {name: AutoModelForCausalLM.from_pretrained(path) for name in VARIANTS}
    optimizers = {}
    for name, kwargs in VARIANTS.items():
        for param in models[name].parameters():
            param.grad = torch.randn_like(param)
        optimizers[name] = torch.optim.AdamW(
            models[name].parameters(), lr=5e-4, foreach=kwargs.get("foreach"), fused=kwargs.get("fused")
        )
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(a.repeats + 10):  # interleaved, so that a slower minute of the machine hits all
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            if i >= 10:  # the first steps create the optimizer state
                times[name].append(time.perf_counter() - start)
    params = sum(x.numel() for x in models["default"].parameters())
    tensors = len(list(models["default"].parameters()))
    print(f"AdamW step, {params} parameters in {tensors} tensors, torch threads {torch.get_num_threads()}, "
          f"median of {a.repeats}")  # fmt: skip
    base = statistics.median(times["default"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<8} {1000 * t:6.2f} ms  {t / base:.2f}x the default's time")


if __name__ == "__main__":
    main()
