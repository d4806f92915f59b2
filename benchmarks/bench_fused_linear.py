"""Benchmark of `kernels.fused_linear_hybrid_loss`; prints ratios against baselines of the same run.

CPU (default, small so it runs anywhere): fused (chunked LM head + hybrid loss, torch backend)
against unfused autograd (logits = hidden @ Wᵀ materialised, log_softmax → KL → backward),
N=2048, H=256, V=32,000, fp32. Time: best of `--repeats` interleaved runs in this process. Peak
memory: each provider once in a fresh child process (VmHWM − VmRSS after the inputs are built;
torch's CPU allocations are invisible to tracemalloc).

GPU (`--device cuda`): N=8192, H=4096, V=128,256, bf16; ours (triton backend, teacher log-probs
[N, V] given, as the teacher service sends them) against Liger-Kernel's `LigerFusedLinearJSD` with
beta=1 (which also runs the teacher's LM head from teacher hidden states) and against unfused
autograd. Time with CUDA events, peak memory with torch.cuda.max_memory_allocated above the inputs.
Liger is imported lazily and skipped with a message when absent (it is not a dependency).

Run: `python -m benchmarks.bench_fused_linear` or `python -m benchmarks.bench_fused_linear --device cuda`.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import kernels
from benchmarks.bench_dense_kl import status_bytes

CPU_PROVIDERS = ("unfused", "fused")


def make_inputs(
    n: int, h: int, v: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = torch.randn(v, h, generator=g, device=device).mul_(h**-0.5).to(dtype)
    lq = torch.randn(n, v, generator=g, device=device).mul_(2)
    for i in range(0, n, 256):
        lq[i : i + 256] -= lq[i : i + 256].logsumexp(-1, keepdim=True)
    return hidden, weight, lq.to(dtype)


def run_provider(name: str, hidden: torch.Tensor, weight: torch.Tensor, lq: torch.Tensor) -> None:
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if name == "unfused":
        lp = torch.log_softmax((h @ w.t()).float(), dim=-1)
        kl = (lp.exp() * (lp - lq.float())).sum(-1)
    else:
        kl = kernels.fused_linear_hybrid_loss(h, w, lq).kl
    torch.autograd.grad(kl.sum(), (h, w))  # the gradients themselves, without AccumulateGrad copies


def worker(name: str, n: int, h: int, v: int) -> None:
    hidden, weight, lq = make_inputs(n, h, v, torch.float32, "cpu")
    # warm-up: code pages and thread pools are not the op's memory
    run_provider(name, hidden[:2], weight[:64], lq[:2, :64])
    gc.collect()
    base = status_bytes("VmRSS")
    run_provider(name, hidden, weight, lq)
    print(json.dumps({"peak_bytes": status_bytes("VmHWM") - base}))


def bench_cpu(n: int, h: int, v: int, repeats: int) -> None:
    print(f"CPU fp32 N={n} H={h} V={v}, torch threads={torch.get_num_threads()}, best of {repeats}")
    hidden, weight, lq = make_inputs(n, h, v, torch.float32, "cpu")
    best = dict.fromkeys(CPU_PROVIDERS, float("inf"))
    for _ in range(repeats):
        for name in CPU_PROVIDERS:
            start = time.perf_counter()
            run_provider(name, hidden, weight, lq)
            best[name] = min(best[name], time.perf_counter() - start)
    mem = {}
    for name in CPU_PROVIDERS:
        cmd = [sys.executable, "-m", "benchmarks.bench_fused_linear", "--worker", name, "--n", str(n)]
        cmd += ["--hidden", str(h), "--vocab", str(v), "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        mem[name] = int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    print(f"  {'provider':<10}{'time s':>9}{'speedup':>9}{'peak MiB':>10}{'mem ratio':>11}")
    for name in CPU_PROVIDERS:
        print(
            f"  {name:<10}{best[name]:>9.3f}{best['unfused'] / best[name]:>8.2f}x"
            f"{mem[name] / 2**20:>10.0f}{mem[name] / mem['unfused']:>10.3f}x"
        )


def _cuda_measure(fn: Callable[[], None], iters: int = 5) -> tuple[float, int]:
    """(median ms, peak bytes above what was allocated before) of fn on the current GPU."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() - base


def _liger_provider(hidden: torch.Tensor, weight: torch.Tensor) -> Callable[[], None] | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        print("  liger-kernel is not installed: LigerFusedLinearJSD skipped (pip install liger-kernel)")
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    t_hidden, t_weight = hidden.clone(), weight.clone()

    def run() -> None:
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        jsd(h, w, t_hidden, t_weight, None).backward()  # no labels: every position counts

    return run


def bench_gpu(n: int, h: int, v: int) -> None:
    if not torch.cuda.is_available():
        print("bench_fused_linear --device cuda: CUDA is not available on this machine; nothing measured.")
        return
    hidden, weight, lq = make_inputs(n, h, v, torch.bfloat16, "cuda")
    providers: dict[str, Callable[[], None]] = {
        "unfused": lambda: run_provider("unfused", hidden, weight, lq),
        "fused (ours)": lambda: run_provider("fused", hidden, weight, lq),
    }
    liger = _liger_provider(hidden, weight)
    if liger is not None:
        providers["liger jsd b=1"] = liger
    print(f"{torch.cuda.get_device_name()}  N={n} H={h} V={v} bf16, forward+backward")
    results = {name: _cuda_measure(fn) for name, fn in providers.items()}
    ref_ms, ref_mem = results.get("liger jsd b=1", results["unfused"])
    for name, (ms, mem) in results.items():
        print(
            f"  {name:<15}{ms:>9.1f} ms{ref_ms / ms:>7.2f}x speed{mem / 2**30:>8.2f} GiB"
            f"{mem / ref_mem:>7.2f}x memory (ratios vs {'liger' if liger else 'unfused'})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker", choices=CPU_PROVIDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.n, args.hidden, args.vocab)
    elif args.device == "cpu":
        bench_cpu(args.n or 2048, args.hidden or 256, args.vocab or 32_000, args.repeats)
    else:
        bench_gpu(args.n or 8192, args.hidden or 4096, args.vocab or 128_256)


if __name__ == "__main__":
    main()
