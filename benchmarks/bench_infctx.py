"""Benchmark infinite-context training (``--seq-len``): peak memory and time of a training step (not a test).

Each form runs in its own Python process (so the peak resident memory, ``resource.getrusage``'s
``ru_maxrss``, is that form's alone): the trainer is set up on the shipped corpus (byte tokens) with a
new model of the demo's shape (RWKV-7 L4-D128, head size 32, fp32, one row per step), takes one warm-up
step and one timed step (the trainer's own ``train_step``: forward, backward, clipping, AdamW). The
forms:

* ``setup``: no step at all (the process, torch, the model, the optimizer, the data): the floor;
* ``window 1024``: the plain step on 1024-token windows;
* ``seq 65536 / 1024, k=1``: sequences of 65536 tokens run in 1024-token windows with the state
  carried, the gradient cut at every window (``--state-grad-windows 1``);
* ``seq 65536 / 1024, k=4``: the same with the gradient through groups of 4 windows;
* ``window 8192``: the plain step on 8192-token windows, to show what grows with the window.

The table gives each form's peak RSS, its excess over ``setup``, the step's seconds and tokens/s, and
the ratio of peak RSS and of step time to the plain 1024-token window; and the load average (the
machine is shared, so the times are rough).

    python benchmarks/bench_infctx.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare" / "train.txt"
FORMS = {  # name: (ctx_len, seq_len, state_grad_windows, steps)
    "setup": (1024, 0, 1, 0),
    "window 1024": (1024, 0, 1, 2),
    "seq 65536 / 1024, k=1": (1024, 65536, 1, 2),
    "seq 65536 / 1024, k=4": (1024, 65536, 4, 2),
    "window 8192": (8192, 0, 1, 2),
}


def child(form: str) -> None:
    """Run one form in this process and print its numbers as one JSON line."""
    import torch

    from rwkvkit.train.config import TrainConfig
    from rwkvkit.train.trainer import Trainer

    torch.manual_seed(0)
    ctx_len, seq_len, k, steps = FORMS[form]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            data=str(CORPUS), tokenizer="byte", n_layer=4, n_embd=128, head_size=32, ctx_len=ctx_len,
            seq_len=seq_len, state_grad_windows=k, batch_size=1, steps=max(steps, 1), warmup_steps=0, out=out,
            progress=False, plot_every=0,
        )  # fmt: skip
        trainer = Trainer(cfg)
        trainer.setup()
        seconds, loss = float("nan"), float("nan")
        for _ in range(steps):  # the last one is timed
            t0 = time.perf_counter()
            entry, _ = trainer.train_step(progress=0.0)
            seconds, loss = time.perf_counter() - t0, entry["loss"]
        trainer.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tokens = seq_len or ctx_len
    print(
        json.dumps(
            {"form": form, "peak_mib": peak_kib / 1024, "seconds": seconds, "tokens": tokens, "loss": loss}
        )
    )


def run(form: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # this checkout
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, "--child", form], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{form}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", choices=list(FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--forms", nargs="*", default=list(FORMS), choices=list(FORMS), help="forms to run")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    print(
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
        f"load average {os.getloadavg()}"
    )
    print("RWKV-7 L4-D128 (byte vocab, fp32, CPU), 1 row per step, the second step timed\n")
    rows = {form: run(form) for form in args.forms}
    floor = rows.get("setup", {}).get("peak_mib", 0.0)
    base = rows.get("window 1024")
    print(
        f"{'form':<24} {'peak RSS MiB':>12} {'over setup':>10} {'step s':>8} {'tok/s':>8} "
        f"{'RSS ratio':>9} {'time ratio':>10}"
    )
    for form, r in rows.items():
        stepped = FORMS[form][3] > 0
        rss_ratio = f"{r['peak_mib'] / base['peak_mib']:.3f}" if base else "-"
        time_ratio = f"{r['seconds'] / base['seconds']:.1f}" if base and stepped else "-"
        seconds = f"{r['seconds']:.2f}" if stepped else "-"
        rate = f"{r['tokens'] / r['seconds']:,.0f}" if stepped else "-"
        print(
            f"{form:<24} {r['peak_mib']:>12.0f} {r['peak_mib'] - floor:>10.0f} {seconds:>8} {rate:>8} "
            f"{rss_ratio:>9} {time_ratio:>10}"
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
