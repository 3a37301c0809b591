"""Benchmark the JAX WKV operators against rwkvkit's torch operators and rwkv-ops (not a test).

For WKV-6 and WKV-7, each shape (B=1, H=12, N=64 at T = 512, 2048, 4096, plus B=8 at T=512) and each
implementation, times forward and forward+backward (gradients of every input and of the initial state,
loss = sum of squares of y and of the final state) and prints ONE markdown table of medians over
--repeats runs, the compile times of the JAX forms in their own columns. Implementations, each run in
its own process (one at a time, so they do not share the cores):

    jax-scan      rwkvkit.jax wkv6 / wkv7, impl="reference" (a lax.scan over steps), jitted
    jax-chunked   rwkvkit.jax wkv6 / wkv7, impl="chunked", jitted
    torch-chunked rwkvkit.wkv wkv6 / wkv7, impl="chunked" (PyTorch, CPU)
    rwkv-ops      rwkv-ops 0.11.3's op on its CPU path (Keras-on-JAX, native kernel), jitted; run by the
                  Python of --rwkv-ops-python (a separate venv: pip install rwkv-ops==0.11.3 jax keras)

A peer that cannot run (not installed, op missing, its backward failing) is reported as unavailable and
the rest of the table is still printed. The inputs are drawn like bench_wkv.py's (the models' ranges);
rwkv-ops takes the decay as log(-log decay), which the worker converts to.

    nice python benchmarks/bench_jax.py --repeats 3
    python benchmarks/bench_jax.py --ops wkv7 --T 2048 --impls jax-chunked torch-chunked
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("jax-scan", "jax-chunked", "torch-chunked", "rwkv-ops")
DEFAULT_SHAPES = ((1, 512), (1, 2048), (1, 4096), (8, 512))  # (B, T)
RWKV_OPS_PYTHON = "/tmp/rwkvops-venv/bin/python"


# ---------------------------------------------------------------------------------------------------
# Inputs (numpy, shared by every worker): float32, [r, w, k, v, u | a, b, state] in rwkvkit's contract.
# ---------------------------------------------------------------------------------------------------


def make_inputs(op: str, B: int, T: int, H: int, N: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    state = 0.1 * randn(B, H, N, N)
    r, k, v = randn(B, T, H, N), 0.5 * randn(B, T, H, N), randn(B, T, H, N)
    if op == "wkv6":  # w = -exp(time_decay + small lora), time_decay -6 .. -1 across channels
        time_decay = np.linspace(-6.0, -1.0, H * N, dtype=np.float32).reshape(H, N)
        w = -np.exp(time_decay + 0.1 * randn(B, T, H, N))
        return [r, w, k, v, 0.5 * randn(H, N), state]
    w = -np.exp(-0.5) / (1 + np.exp(-randn(B, T, H, N)))  # -exp(-0.5) sigmoid(z)
    kk = randn(B, T, H, N)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    iclr = 1 / (1 + np.exp(-randn(B, T, H, N)))
    return [r, w.astype(np.float32), k, v, -kk, (kk * iclr).astype(np.float32), state]


def median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# Workers: each returns {"fwd", "fwdbwd"} seconds (and "compile_fwd", "compile_bwd" for jitted forms).
# ---------------------------------------------------------------------------------------------------


def _jax_timings(call: Callable, inputs: list, repeats: int) -> dict:
    """Times a JAX function ``call(*inputs) -> (y, state)``: jitted forward and jitted value_and_grad
    over every input, compile times measured apart (lower + compile)."""
    import jax
    import jax.numpy as jnp

    xs = [jnp.asarray(x) for x in inputs]

    def loss(*xs):
        y, s = call(*xs)
        return (y * y).sum() + (s * s).sum()

    out = {}
    grad = jax.value_and_grad(loss, argnums=tuple(range(len(xs))))
    for name, fn in (("fwd", call), ("fwdbwd", grad)):
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(fn).lower(*xs).compile()
        except Exception as e:  # e.g. a peer's loop with no reverse-mode rule: keep its forward
            if name == "fwd":
                raise
            out["note"] = f"no backward: {type(e).__name__}: {str(e).strip().splitlines()[0][:80]}"
            break
        out["compile_" + name] = time.perf_counter() - t0
        out[name] = median_time(lambda c=compiled: jax.block_until_ready(c(*xs)), repeats)
    return out


def worker_rwkvkit_jax(op: str, impl: str, inputs: list, repeats: int) -> dict:
    import importlib

    try:
        module = importlib.import_module(f"rwkvkit.jax.{op}")
    except ImportError as e:
        raise Unavailable(f"rwkvkit.jax.{op} is not available ({e})") from None
    fn = getattr(module, op)
    return _jax_timings(lambda *x: fn(*x[:-1], x[-1], impl=impl), inputs, repeats)


def worker_torch(op: str, inputs: list, repeats: int) -> dict:
    import torch

    from rwkvkit import wkv

    fn = getattr(wkv, op)
    xs = [torch.from_numpy(x) for x in inputs]

    def forward() -> None:
        with torch.no_grad():
            fn(*xs, impl="chunked")

    leaves = [x.clone().requires_grad_() for x in xs]

    def forward_backward() -> None:
        y, s = fn(*leaves, impl="chunked")
        (y.square().sum() + s.square().sum()).backward()
        for x in leaves:
            x.grad = None

    return {"fwd": median_time(forward, repeats), "fwdbwd": median_time(forward_backward, repeats)}


def worker_rwkv_ops(op: str, inputs: list, repeats: int) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("KERNEL_TYPE", "native")
    try:
        import rwkv_ops
    except ImportError as e:
        raise Unavailable(f"rwkv-ops is not importable here ({e})") from None
    import jax.numpy as jnp

    B, T, H, N = inputs[0].shape
    if op == "wkv7":
        gdr, _ = rwkv_ops.get_generalized_delta_rule(HEAD_SIZE=N, KERNEL_TYPE="native")

        def call(r, w, k, v, a, b, s):  # rwkv-ops: decay = exp(-exp(w)); state [value, key] like ours
            return gdr(r, jnp.log(-w), k, v, a, b, initial_state=s, output_final_state=True)
    else:
        rwkv6 = rwkv_ops.get_rwkv6_kernel(HEAD_SIZE=N, KERNEL_TYPE="native")

        def call(r, w, k, v, u, s):  # (B, T, C) inputs, decay = exp(-exp(w))
            C = H * N
            flat = [x.reshape(B, T, C) for x in (r, k, v, jnp.log(-w))]
            y, s = rwkv6(*flat, u, initial_state=s, output_final_state=True)
            return y, s

    return _jax_timings(call, inputs, repeats)


class Unavailable(Exception):
    """A peer that cannot run here; its message goes into the table."""


def run_worker(impl: str, op: str, shapes: list[tuple[int, int]], H: int, N: int, repeats: int) -> None:
    """Worker process: one line of JSON per shape on stdout."""
    for B, T in shapes:
        inputs = make_inputs(op, B, T, H, N)
        try:
            if impl == "torch-chunked":
                res = worker_torch(op, inputs, repeats)
            elif impl == "rwkv-ops":
                res = worker_rwkv_ops(op, inputs, repeats)
            else:
                res = worker_rwkvkit_jax(
                    op, "reference" if impl == "jax-scan" else "chunked", inputs, repeats
                )
        except Unavailable as e:
            res = {"unavailable": str(e)}
        except Exception as e:  # a peer failing (e.g. no backward): reported, the table goes on
            res = {"unavailable": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"}
        print(json.dumps({"B": B, "T": T, **res}), flush=True)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


def spawn(impl: str, op: str, args: argparse.Namespace) -> dict[tuple[int, int], dict]:
    """Run one implementation in its own process; {(B, T): result}, or every shape unavailable."""
    python = args.rwkv_ops_python if impl == "rwkv-ops" else sys.executable
    shapes = [f"{B}x{T}" for B, T in args.shapes]
    cmd = [python, str(Path(__file__).resolve()), "--worker", impl, "--ops", op, "--shapes", *shapes]
    cmd += ["--repeats", str(args.repeats), "--H", str(args.H), "--N", str(args.N)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if impl == "rwkv-ops":
        env.pop("PYTHONPATH")  # its own venv only: rwkv-ops, jax, keras
        env.update(KERAS_BACKEND="jax", KERNEL_TYPE="native")
    if not Path(python).exists():
        return {
            s: {"unavailable": f"no Python at {python} (install rwkv-ops in a venv there)"}
            for s in args.shapes
        }
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        stdout, why = done.stdout, done.stderr.strip().splitlines()[-1:] if done.returncode else []
    except subprocess.TimeoutExpired as e:
        stdout, why = (
            (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""),
            ["timeout"],
        )
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[(row.pop("B"), row.pop("T"))] = row
    for s in args.shapes:
        results.setdefault(s, {"unavailable": f"worker failed: {why[0][:120] if why else 'no output'}"})
    return results


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_table(op: str, table: dict[str, dict], shapes: list[tuple[int, int]]) -> None:
    print(f"\n### {op.upper()} (H={ARGS.H}, N={ARGS.N}; ms, medians of {ARGS.repeats})\n")
    print("| B | T | impl | fwd | fwd+bwd | compile fwd / fwd+bwd (s) | scan / this | this / jax-chunked |")
    print("|---|---|---|---|---|---|---|---|")
    for s in shapes:
        scan = table.get("jax-scan", {}).get(s, {}).get("fwdbwd")
        chunked = table.get("jax-chunked", {}).get(s, {}).get("fwdbwd")
        for impl, rows in table.items():
            res = rows[s]
            if "unavailable" in res:
                print(f"| {s[0]} | {s[1]} | {impl} | unavailable: {res['unavailable']} | | | | |")
                continue
            fb = res.get("fwdbwd")
            comp = "-"
            if "compile_fwd" in res:
                comp = f"{res['compile_fwd']:.1f} / " + (f"{res['compile_fwdbwd']:.1f}" if fb else "-")
            speed = f"{scan / fb:.1f}x" if scan and fb else "-"
            ratio = f"{fb / chunked:.2f}x" if chunked and fb and impl != "jax-chunked" else "-"
            bwd = fmt_ms(fb) if fb else res.get("note", "-")
            row = f"| {s[0]} | {s[1]} | {impl} | {fmt_ms(res['fwd'])} | {bwd} | {comp} |"
            print(f"{row} {speed} | {ratio} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=["wkv6", "wkv7"], choices=["wkv6", "wkv7"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--shapes", nargs="+", default=[f"{B}x{T}" for B, T in DEFAULT_SHAPES], help="BxT ...")
    p.add_argument("--T", nargs="+", type=int, help="B=1 at these T (replaces --shapes)")
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per implementation process")
    p.add_argument("--rwkv-ops-python", default=RWKV_OPS_PYTHON)
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.shapes = [(1, T) for T in args.T] if args.T else [tuple(map(int, s.split("x"))) for s in args.shapes]
    return args


def main() -> None:
    if ARGS.worker:
        run_worker(ARGS.worker, ARGS.ops[0], ARGS.shapes, ARGS.H, ARGS.N, ARGS.repeats)
        return
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (other processes on the cores skew timings)")
    print(f"# {os.cpu_count()} CPUs; each implementation in its own process, one at a time")
    print("# the ratio columns are of fwd+bwd times; this / jax-chunked > 1: slower than rwkvkit.jax chunked")
    for op in ARGS.ops:
        table = {impl: spawn(impl, op, ARGS) for impl in ARGS.impls}
        print_table(op, table, ARGS.shapes)
    print(f"\n# load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    ARGS = parse_args()
    main()
