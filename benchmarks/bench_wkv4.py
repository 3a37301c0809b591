"""Benchmark the WKV-4 operator: chunk-parallel vs step-by-step reference (not a test).

Times forward-only (under torch.no_grad) and forward+backward (gradients of w, u, k, v and the initial
state) for each sequence length, and prints a markdown table with the median of --repeats runs and the
speedup of the chunked form. Default shapes are one L12-D768 RWKV-4 layer: B=1, C=768.

    python benchmarks/bench_wkv4.py
    python benchmarks/bench_wkv4.py --chunk-sizes 16 32 64 --lengths 512 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from rwkvkit.wkv.wkv4 import DEFAULT_CHUNK_SIZE, wkv4, wkv4_log_decay


def make_inputs(B: int, T: int, C: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """w, u (C,), k, v (B, T, C) like RWKV-4's init, and a carried state (aa, bb, pp) each (B, C)."""
    g = torch.Generator().manual_seed(seed)
    w = wkv4_log_decay(torch.linspace(-5.0, 3.0, C))
    u = torch.full((C,), 0.3).log() + 0.5 * torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    state = [
        torch.randn(B, C, generator=g),
        torch.rand(B, C, generator=g) + 0.5,
        torch.randn(B, C, generator=g),
    ]
    return [w, u, k, v], state


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
    inputs: list[torch.Tensor], state: list[torch.Tensor], impl: str, chunk: int | None, repeats: int
) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) for one implementation."""

    def forward() -> None:
        with torch.no_grad():
            wkv4(*inputs, state, impl=impl, chunk_size=chunk)

    def forward_backward() -> None:
        leaves = [x.detach().requires_grad_() for x in inputs + state]
        y, (aa, bb, pp) = wkv4(*leaves[:4], leaves[4:], impl=impl, chunk_size=chunk)
        loss = y.sum() + aa.sum() + bb.sum()
        torch.autograd.grad(loss, leaves)

    return median_time(forward, repeats), median_time(forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
        f"B={args.batch}, C={args.channels}, float32, median of {args.repeats}\n"
    )
    print("| T | impl | fwd (ms) | fwd+bwd (ms) | fwd+bwd speedup |")
    print("|---|---|---|---|---|")
    for T in args.lengths:
        inputs, state = make_inputs(args.batch, T, args.channels)
        ref_f, ref_fb = time_impl(inputs, state, "reference", None, args.repeats)
        print(f"| {T} | reference | {ref_f * 1e3:.1f} | {ref_fb * 1e3:.1f} | 1.00x |", flush=True)
        for chunk in args.chunk_sizes:
            f, fb = time_impl(inputs, state, "chunked", chunk, args.repeats)
            print(
                f"| {T} | chunked ({chunk}) | {f * 1e3:.1f} | {fb * 1e3:.1f} | {ref_fb / fb:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
