"""Benchmark of the dense-KL kernels; prints ratios against a baseline measured in the same run.

CPU (default): the fused torch path (`kernels.hybrid_loss(..., backend="torch")`, forward + backward,
with and without inplace_grad) against naive autograd (log_softmax → Σ p(log p − log q) → backward)
at N=4096 and V ∈ {32,000, 151,936}, fp32. Goal: ≥ 2× faster, ≤ 0.5× the peak memory.
- time: best of `--repeats` interleaved runs per provider, all in this process (best-of filters out
  the noise of a shared machine).
- peak memory: torch's CPU allocations are invisible to tracemalloc, so each provider runs once in a
  fresh child process (`--worker`) that builds the same inputs, reads its resident set size, runs
  forward + backward and reports its peak RSS (VmHWM) − that RSS, i.e. the peak bytes the op added on top of
  its inputs. When the machine lacks the memory for the naive baseline at the asked N, N is
  reduced and the script says so (ratios are per element and carry over).

GPU (`--device cuda`): achieved bytes/s of the triton full-vocabulary kernels against a
device-to-device copy of the same size measured in the same run, N=16,384, V=151,936, bf16.
Goal ≥ 80% of copy bandwidth. Exits with a clear message when CUDA is absent.

Run: `python -m benchmarks.bench_dense_kl` (CPU) or `python -m benchmarks.bench_dense_kl --device cuda`.
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

PROVIDERS = ("naive", "fused", "fused_inplace")


def make_inputs(n: int, v: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits and teacher log-probs, normalised chunk-wise so no extra [N, V] is allocated."""
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, v, generator=g, device=device).mul_(2).to(dtype)
    lq = torch.randn(n, v, generator=g, device=device).mul_(2)
    for i in range(0, n, 64):
        lq[i : i + 64] -= lq[i : i + 64].logsumexp(-1, keepdim=True)
    return z, lq.to(dtype)


def run_provider(name: str, z: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Forward + backward of one provider; returns the per-row KL. fused_inplace consumes z."""
    x = z.detach().requires_grad_()
    if name == "naive":
        lp = torch.log_softmax(x, dim=-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
    else:
        logits = x.view_as(x)  # a non-leaf alias: inplace_grad writes the gradient into z's storage
        kl = kernels.hybrid_loss(logits, lq, inplace_grad=name == "fused_inplace", backend="torch").kl
    # autograd.grad hands back ∇_z itself, as the learner's LM-head matmul would receive it;
    # .backward() on a leaf would add AccumulateGrad's own [N, V] copy to every provider
    (grad,) = torch.autograd.grad(kl, x, torch.ones_like(kl))
    del grad
    return kl.detach()


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak of this process image; unlike ru_maxrss it is not inherited
    from the parent across fork + exec) from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def worker(name: str, n: int, v: int) -> None:
    """Child process: peak bytes that one forward + backward adds on top of its inputs."""
    z, lq = make_inputs(n, v, torch.float32, "cpu")
    # warm-up: code pages and thread pools are not the op's memory
    run_provider(name, z[:2].clone(), lq[:2])
    gc.collect()
    base = status_bytes("VmRSS")
    run_provider(name, z, lq)
    peak = status_bytes("VmHWM")
    print(json.dumps({"peak_bytes": peak - base}))


def peak_memory(name: str, n: int, v: int) -> int:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_dense_kl",
        "--worker",
        name,
        "--n",
        str(n),
        "--vocab",
        str(v),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def best_times(z: torch.Tensor, lq: torch.Tensor, repeats: int) -> dict[str, float]:
    """Best wall time per provider over interleaved repeats (the inplace input copy is not timed)."""
    best = dict.fromkeys(PROVIDERS, float("inf"))
    for _ in range(repeats):
        for name in PROVIDERS:
            x = z.clone() if name == "fused_inplace" else z
            start = time.perf_counter()
            run_provider(name, x, lq)
            best[name] = min(best[name], time.perf_counter() - start)
            del x
    return best


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def fit_rows(n: int, v: int) -> int:
    """Largest N ≤ n for which inputs + the naive baseline (~8 fp32 [N, V]) fit in 70% of free RAM."""
    per_row = 10 * v * 4
    fit = int(0.7 * _available_bytes()) // per_row
    return max(64, min(n, fit))


def bench_cpu(n_asked: int, vocabs: list[int], repeats: int) -> None:
    print(f"CPU, fp32, torch threads={torch.get_num_threads()}, best of {repeats}")
    for v in vocabs:
        n = fit_rows(n_asked, v)
        if n < n_asked:
            print(f"  note: N reduced {n_asked} -> {n} at V={v}: the naive baseline would not fit in RAM")
        z, lq = make_inputs(n, v, torch.float32, "cpu")
        err = (run_provider("fused", z, lq) - run_provider("naive", z, lq)).abs().max().item()
        ref = kernels.reference.hybrid_terms(z[:8], lq[:8])[0]  # float64 ground truth, 8 rows
        err_ref = (run_provider("fused", z[:8], lq[:8]).double() - ref).abs().max().item()
        times = best_times(z, lq, repeats)
        del z, lq
        gc.collect()
        mem = {p: peak_memory(p, n, v) for p in PROVIDERS}
        print(f"N={n} V={v}  max |kl_fused - kl_naive| = {err:.2e}, vs float64 reference = {err_ref:.2e}")
        print(f"  {'provider':<14}{'time s':>9}{'speedup':>9}{'peak MiB':>10}{'mem ratio':>11}")
        for p in PROVIDERS:
            print(
                f"  {p:<14}{times[p]:>9.3f}{times['naive'] / times[p]:>8.2f}x"
                f"{mem[p] / 2**20:>10.0f}{mem[p] / mem['naive']:>10.3f}x"
            )


def _cuda_ms(fn: Callable[[], object], iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench_gpu(n: int, v: int) -> None:
    if not torch.cuda.is_available():
        print("bench_dense_kl --device cuda: CUDA is not available on this machine; nothing measured.")
        return
    from kernels.triton_backend import triton_backward, triton_forward
    from kernels.validation import check_inputs

    z, lq = make_inputs(n, v, torch.bfloat16, "cuda")
    inp = check_inputs(z, lq, None, None, None)
    grad = torch.empty_like(z)
    ones = torch.ones(n, device="cuda")
    stats = triton_forward(inp)
    elem = z.element_size()
    copy_ms = _cuda_ms(lambda: grad.copy_(z))
    fwd_ms = _cuda_ms(lambda: triton_forward(inp))
    bwd_ms = _cuda_ms(lambda: triton_backward(inp, stats, ones, ones * 0, grad))
    copy_bw = 2 * n * v * elem / copy_ms / 1e6  # read + write, GB/s
    rows = [
        ("copy (baseline)", copy_ms, copy_bw),
        ("triton forward", fwd_ms, 2 * n * v * elem / fwd_ms / 1e6),
        ("triton backward", bwd_ms, 3 * n * v * elem / bwd_ms / 1e6),
        ("forward+backward", fwd_ms + bwd_ms, 5 * n * v * elem / (fwd_ms + bwd_ms) / 1e6),
    ]
    print(f"{torch.cuda.get_device_name()}  N={n} V={v} bf16 (bytes = logits + teacher read, grad written)")
    for name, ms, bw in rows:
        print(f"  {name:<18}{ms:>9.3f} ms{bw:>9.0f} GB/s{bw / copy_bw:>8.1%} of copy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=None, help="rows (default 4096 CPU, 16384 GPU)")
    ap.add_argument("--vocab", type=int, nargs="+", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.n, args.vocab[0])
    elif args.device == "cpu":
        bench_cpu(args.n or 4096, args.vocab or [32_000, 151_936], args.repeats)
    else:
        bench_gpu(args.n or 16_384, (args.vocab or [151_936])[0])


if __name__ == "__main__":
    main()
