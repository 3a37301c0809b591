"""Benchmark training throughput and memory on this machine (not a test).

Each configuration runs in a fresh process (so its peak RSS is its own): a few optimizer steps of the
real training step (forward, cross-entropy + L2Wrap, backward, clip, AdamW) on random tokens, reporting
the median tokens/s of the timed steps and the process's peak RSS. The peer in the same run is the same
model trained through the step-by-step WKV reference (``impl="reference"``: what a trainer without a
chunked or fused kernel does), at the demo shape.

    python benchmarks/bench_train.py                 # the table in benchmarks/RESULTS.md
    python benchmarks/bench_train.py --only demo     # just the demo-model rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# name -> settings of one run
CONFIGS = {
    "demo fp32": dict(version="7", n_layer=4, n_embd=128, head_size=32, vocab=256, ctx=256, batch=16),
    "demo bf16": dict(
        version="7", n_layer=4, n_embd=128, head_size=32, vocab=256, ctx=256, batch=16, bf16=True
    ),
    "demo fp32, step-by-step WKV (peer)": dict(
        version="7", n_layer=4, n_embd=128, head_size=32, vocab=256, ctx=256, batch=16, impl="reference"
    ),
    "L12-D768 fp32 ctx 512": dict(
        version="7", n_layer=12, n_embd=768, head_size=64, vocab=65536, ctx=512, batch=2
    ),
    "L12-D768 bf16 ctx 512": dict(
        version="7", n_layer=12, n_embd=768, head_size=64, vocab=65536, ctx=512, batch=2, bf16=True
    ),
    "L12-D768 fp32 ctx 1024": dict(
        version="7", n_layer=12, n_embd=768, head_size=64, vocab=65536, ctx=1024, batch=1
    ),
    "L12-D768 fp32 ctx 2048": dict(
        version="7", n_layer=12, n_embd=768, head_size=64, vocab=65536, ctx=2048, batch=1
    ),
    "L12-D768 fp32 ctx 2048, grad checkpoint": dict(
        version="7", n_layer=12, n_embd=768, head_size=64, vocab=65536, ctx=2048, batch=1, checkpoint=True
    ),
}


def run_one(settings: dict, steps: int, warmup: int) -> dict:
    """Train ``steps`` timed steps (after ``warmup``) in this process; tokens/s and peak RSS."""
    import torch
    import torch.nn.functional as F

    from rwkvkit.models import new_model
    from rwkvkit.train.optim import L2Wrap, make_optimizer
    from rwkvkit.wkv import use_impl

    torch.manual_seed(0)
    model = new_model(settings["version"], settings["n_layer"], settings["n_embd"], settings["vocab"],
                      settings["head_size"])  # fmt: skip
    model.grad_checkpoint = settings.get("checkpoint", False)
    optimizer = make_optimizer(model, 6e-4, 0.1)
    B, T, V = settings["batch"], settings["ctx"], settings["vocab"]
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.get("bf16", False))
    times = []
    with use_impl(settings.get("impl")):
        for i in range(warmup + steps):
            x = torch.randint(0, V, (B, T + 1), generator=gen)
            t0 = time.perf_counter()
            with autocast:
                logits, _ = model(x[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            L2Wrap.apply(loss, logits).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_step": B * T,
        "step_s": step,
        "tokens_per_s": B * T / step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="run only configurations whose name contains one of these words")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config here
    args = parser.parse_args()

    if args.one is not None:
        print(json.dumps(run_one(CONFIGS[args.one], args.steps, args.warmup)))
        return

    names = [n for n in CONFIGS if args.only is None or any(w in n for w in args.only)]
    print(f"# training step (fwd + bwd + AdamW), RWKV-7, median of {args.steps} steps after {args.warmup}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    print()
    print("| configuration | params (M) | tokens/step | step s | tokens/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | | | | |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['params_m']:.1f} | {r['tokens_per_step']} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |",
            flush=True,
        )
    print()
    print(f"# torch {r['torch']}, {r['threads']} threads; load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
