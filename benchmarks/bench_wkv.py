"""Benchmark every WKV operator: chunk-parallel vs step-by-step reference (not a test).

For each operator chosen by --ops, each sequence length --T and each chunk size, times forward-only
(under torch.no_grad) and forward+backward (gradients of every input and of the initial state) of the
chunked form against the step-by-step reference, and prints ONE markdown table with the median of
--repeats runs and the speedup of the chunked form (reference / chunked). Operators:

    wkv4   RWKV-4: rwkvkit.wkv.wkv4, per channel, C = H * N channels, state (aa, bb, pp)
    wkv5   RWKV-5.2: rwkvkit.wkv.wkv6 with a constant decay w = -exp(time_decay) (H, N), expanded over B, T
    wkv6   RWKV-6: rwkvkit.wkv.wkv6 with a per-token decay w (B, T, H, N)
    wkv7   RWKV-7: rwkvkit.wkv.wkv7

Default shapes are one L12-D768 layer: B=1, H=12, N=64 (WKV-4: C = 768). Inputs are distributed like
the models produce them (see each make_* function). The default chunk size is each operator's own
DEFAULT_CHUNK_SIZE; --chunk-sizes applies the given sizes to every operator.

    python benchmarks/bench_wkv.py --repeats 3                      # the table in benchmarks/RESULTS.md
    python benchmarks/bench_wkv.py --ops wkv7 --chunk-sizes 16 32 64  # compare WKV-7 chunk sizes
    python benchmarks/bench_wkv.py --ops wkv4 wkv6 --T 2048 --no-reference
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkvkit.wkv import wkv4, wkv6, wkv7
from rwkvkit.wkv.v4 import DEFAULT_CHUNK_SIZE as WKV4_CHUNK_SIZE
from rwkvkit.wkv.v4 import wkv4_log_decay
from rwkvkit.wkv.v6 import DEFAULT_CHUNK_SIZE as WKV6_CHUNK_SIZE
from rwkvkit.wkv.v7 import DEFAULT_CHUNK_SIZE as WKV7_CHUNK_SIZE

Tensors = list[torch.Tensor]

# ---------------------------------------------------------------------------------------------------
# Per operator: the inputs (every tensor a gradient is taken of, the initial state included) and the call.
# Each call returns (y, the final state as a list of tensors).
# ---------------------------------------------------------------------------------------------------


def make_wkv4(B: int, T: int, H: int, N: int, g: torch.Generator) -> Tensors:
    """w, u (C,), k, v (B, T, C) like RWKV-4's init, and a carried state aa, bb, pp each (B, C); C = H * N."""
    C = H * N
    w = wkv4_log_decay(torch.linspace(-5.0, 3.0, C))
    u = torch.full((C,), 0.3).log() + 0.5 * torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    aa = torch.randn(B, C, generator=g)
    bb = torch.rand(B, C, generator=g) + 0.5
    pp = torch.randn(B, C, generator=g)
    return [w, u, k, v, aa, bb, pp]


def call_wkv4(x: Tensors, impl: str, chunk: int | None) -> tuple[torch.Tensor, Tensors]:
    y, state = wkv4(*x[:4], x[4:], impl=impl, chunk_size=chunk)
    return y, list(state)


def _time_decay(H: int, N: int) -> torch.Tensor:
    """A v5.2/v6 layer's time_decay (H, N): -6 to -1 across the channels."""
    return torch.linspace(-6.0, -1.0, H * N).view(H, N)


def make_wkv5(B: int, T: int, H: int, N: int, g: torch.Generator) -> Tensors:
    """r, k, v (B, T, H, N), the constant log-decay w = -exp(time_decay) (H, N) (w in about [-0.37, 0)),
    u (H, N) and the state (B, H, N, N). The call expands w over B and T, as the RWKV-5.2 model does."""
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.exp(_time_decay(H, N))
    u = torch.randn(H, N, generator=g) * 0.5
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    return [r, w, k * 0.5, v, u, state]


def call_wkv5(x: Tensors, impl: str, chunk: int | None) -> tuple[torch.Tensor, Tensors]:
    r, w, k, v, u, state = x
    y, s = wkv6(r, w.expand(r.shape), k, v, u, state, impl=impl, chunk_size=chunk)
    return y, [s]


def make_wkv6(B: int, T: int, H: int, N: int, g: torch.Generator) -> Tensors:
    """r, w, k, v (B, T, H, N), u (H, N), state (B, H, N, N); w = -exp(time_decay + lora) as a v6 layer at
    init makes it: time_decay from -6 to -1 across channels plus a small per-token perturbation (w in
    about [-0.5, 0))."""
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.exp(_time_decay(H, N) + 0.1 * torch.randn(B, T, H, N, generator=g))
    u = torch.randn(H, N, generator=g) * 0.5
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    return [r, w, k * 0.5, v, u, state]


def call_wkv6(x: Tensors, impl: str, chunk: int | None) -> tuple[torch.Tensor, Tensors]:
    y, s = wkv6(*x, impl=impl, chunk_size=chunk)
    return y, [s]


def make_wkv7(B: int, T: int, H: int, N: int, g: torch.Generator) -> Tensors:
    """r, w, k, v, a, b (B, T, H, N) like the RWKV-7 model produces them, and the state (B, H, N, N):
    w = -exp(-0.5) sigmoid(z) in [-0.6066, 0], a = -kk, b = kk * iclr with kk L2-normalized per head."""

    def randn() -> torch.Tensor:
        return torch.randn(B, T, H, N, generator=g)

    w = -torch.exp(torch.tensor(-0.5)) * torch.sigmoid(randn())
    kk = F.normalize(randn(), dim=-1)
    r, k, v, iclr = randn(), randn() * 0.5, randn(), torch.sigmoid(randn())
    state = torch.randn(B, H, N, N, generator=g) * 0.1
    return [r, w, k, v, -kk, kk * iclr, state]


def call_wkv7(x: Tensors, impl: str, chunk: int | None) -> tuple[torch.Tensor, Tensors]:
    y, s = wkv7(*x, impl=impl, chunk_size=chunk)
    return y, [s]


@dataclass(frozen=True)
class Op:
    make: Callable[[int, int, int, int, torch.Generator], Tensors]
    call: Callable[[Tensors, str, int | None], tuple[torch.Tensor, Tensors]]
    default_chunk: int


OPS: dict[str, Op] = {
    "wkv4": Op(make_wkv4, call_wkv4, WKV4_CHUNK_SIZE),
    "wkv5": Op(make_wkv5, call_wkv5, WKV6_CHUNK_SIZE),
    "wkv6": Op(make_wkv6, call_wkv6, WKV6_CHUNK_SIZE),
    "wkv7": Op(make_wkv7, call_wkv7, WKV7_CHUNK_SIZE),
}

# ---------------------------------------------------------------------------------------------------
# The shared harness.
# ---------------------------------------------------------------------------------------------------


def median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time in seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_impl(op: Op, inputs: Tensors, impl: str, chunk: int | None, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one implementation of `op` on `inputs`.

    forward+backward: loss = sum of squares of y and of every final-state tensor, backward to every
    input and the initial state."""

    def forward() -> None:
        with torch.no_grad():
            op.call(inputs, impl, chunk)

    leaves = [x.clone().requires_grad_() for x in inputs]

    def forward_backward() -> None:
        y, state = op.call(leaves, impl, chunk)
        loss = y.square().sum() + sum(s.square().sum() for s in state)
        loss.backward()
        for x in leaves:
            x.grad = None

    return median_time(forward, repeats), median_time(forward_backward, repeats)


def print_row(name: str, T: int, impl: str, t: tuple[float, float], ref: tuple[float, float] | None) -> None:
    """One table row: times in ms and speedups reference / this ("-" without a reference)."""
    s_fwd = f"{ref[0] / t[0]:.1f}x" if ref else "-"
    s_fb = f"{ref[1] / t[1]:.1f}x" if ref else "-"
    print(f"| {name} | {T} | {impl} | {t[0] * 1e3:.1f} | {s_fwd} | {t[1] * 1e3:.1f} | {s_fb} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=list(OPS),
        default=list(OPS),
        help="operators to time, in this order (default: all four: wkv4 wkv5 wkv6 wkv7)",
    )
    parser.add_argument(
        "--T", type=int, nargs="+", default=[512, 2048, 4096], help="sequence lengths (default 512 2048 4096)"
    )
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--heads", type=int, default=12, help="number of heads H (default 12)")
    parser.add_argument(
        "--head-size", type=int, default=64, help="head size N (default 64); WKV-4 gets C = H * N channels"
    )
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="+",
        default=None,
        help="chunk sizes of the chunked form to time, for every operator (default: each operator's "
        f"DEFAULT_CHUNK_SIZE: wkv4 {WKV4_CHUNK_SIZE}, wkv5/wkv6 {WKV6_CHUNK_SIZE}, wkv7 {WKV7_CHUNK_SIZE})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per cell after one warm-up, the median is shown (default 3)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the (slow) step-by-step reference; speedups show '-'",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    B, H, N = args.batch, args.heads, args.head_size
    print(
        f"# WKV operators {' '.join(args.ops)}, B={B} H={H} N={N} (WKV-4: C={H * N}), fp32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"# median of {args.repeats} runs, milliseconds; speedup = reference / chunked")
    print(
        f"# load average at start: {os.getloadavg()[0]:.2f} (other processes on the cores skew the timings)"
    )
    print()
    print("| op | T | impl | forward ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.ops:
        op = OPS[name]
        chunks = args.chunk_sizes or [op.default_chunk]
        for T in args.T:
            inputs = op.make(B, T, H, N, torch.Generator().manual_seed(0))
            ref = None
            if not args.no_reference:
                ref = time_impl(op, inputs, "reference", None, args.repeats)
                print_row(name, T, "reference", ref, ref)
            for chunk in chunks:
                print_row(
                    name, T, f"chunked {chunk}", time_impl(op, inputs, "chunked", chunk, args.repeats), ref
                )
    print()
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
