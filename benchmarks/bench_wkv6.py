"""Benchmark the RWKV-5.2/6 WKV operator: chunk-parallel vs step-by-step reference (not a test).

Times forward-only (under torch.no_grad) and forward+backward (gradients of r, w, k, v, u and the initial
state) for each sequence length, and prints a markdown table with the median of --repeats runs and the
speedup of the chunked form. Default shapes are one L12-D768 layer: B=1, H=12, N=64.

    python benchmarks/bench_wkv6.py                        # T = 512 2048, default chunk size
    python benchmarks/bench_wkv6.py --chunk-sizes 16 32 64   # compare chunk sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from rwkvkit.wkv.wkv6 import DEFAULT_CHUNK_SIZE, wkv6


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """r, w, k, v (B, T, H, N) and u (H, N); w = -exp(time_decay + lora) as a v6 layer at init makes it:
    time_decay from -6 to -1 across channels, a small per-token perturbation (w in about [-0.5, 0))."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    time_decay = torch.linspace(-6.0, -1.0, H * N).view(H, N)
    w = -torch.exp(time_decay + 0.1 * torch.randn(B, T, H, N, generator=g))
    u = torch.randn(H, N, generator=g) * 0.5
    return [r, w, k * 0.5, v, u]


def median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time in seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_impl(
    inputs: list[torch.Tensor], state: torch.Tensor, impl: str, chunk: int | None, repeats: int
) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) for one implementation."""

    def forward() -> None:
        with torch.no_grad():
            wkv6(*inputs, state, impl=impl, chunk_size=chunk)

    leaves = [x.clone().requires_grad_() for x in [*inputs, state]]

    def forward_backward() -> None:
        y, s = wkv6(*leaves, impl=impl, chunk_size=chunk)
        (y.square().sum() + s.square().sum()).backward()
        for x in leaves:
            x.grad = None

    return median_time(forward, repeats), median_time(forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--heads", type=int, default=12, help="number of heads H (default 12)")
    parser.add_argument("--head-size", type=int, default=64, help="head size N (default 64)")
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=[DEFAULT_CHUNK_SIZE],
        help=f"chunk sizes of the chunked form to time (default {DEFAULT_CHUNK_SIZE})",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median shown)")
    parser.add_argument("--no-reference", action="store_true", help="skip the step-by-step reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    B, H, N = args.batch, args.heads, args.head_size
    print(f"# WKV-6, B={B} H={H} N={N}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# median of {args.repeats} runs, milliseconds; speedup = reference / chunked")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    print()
    print("| T | impl | forward ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    for T in args.T:
        inputs = make_inputs(B, T, H, N)
        state = torch.randn(B, H, N, N) * 0.1
        ref = None
        if not args.no_reference:
            ref = time_impl(inputs, state, "reference", None, args.repeats)
            print(f"| {T} | reference | {ref[0] * 1e3:.1f} | 1.0x | {ref[1] * 1e3:.1f} | 1.0x |", flush=True)
        for chunk in args.chunk_sizes:
            fwd, fb = time_impl(inputs, state, "chunked", chunk, args.repeats)
            s_fwd = f"{ref[0] / fwd:.1f}x" if ref else "-"
            s_fb = f"{ref[1] / fb:.1f}x" if ref else "-"
            print(
                f"| {T} | chunked {chunk} | {fwd * 1e3:.1f} | {s_fwd} | {fb * 1e3:.1f} | {s_fb} |", flush=True
            )
    print()
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
