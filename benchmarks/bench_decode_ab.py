"""Decode speed of two rwkvkit source trees, interleaved in one sitting (a before/after check).

A refactor may not slow decoding; the machine's speed drifts up to 1.5x within minutes, so one tree
measured after the other says little. This script takes two source trees (two checkouts, e.g. a
``git worktree`` at the old commit and the working tree), writes random checkpoints in the official
layout once (fp32 ``.pth`` and its int8 / int4 group-64 quantizations), then runs rounds of fresh
processes, alternating the trees inside each round (A B, then B A, ...). Each process imports rwkvkit
from its tree (``PYTHONPATH``), loads one checkpoint, warms up and reports the median tokens/s of
``--repeats`` decode runs at each batch size (one token per call, carried state). The table shows the
median over rounds per tree, the ratio of those medians, and the median of the per-round ratios (B over the
A process run next to it: the pairing cancels most of the drift between rounds), with the load average
before and after.

    python benchmarks/bench_decode_ab.py --before ../before --after . --versions 7 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_infer import make_checkpoints  # noqa: E402  (the same checkpoints as bench_infer)


def worker(args: argparse.Namespace) -> dict:
    """Decode speeds of one checkpoint with the rwkvkit found on PYTHONPATH; prints a JSON line."""
    import torch

    import rwkvkit
    from rwkvkit.models import load_model

    model = load_model(args.path)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65536, (8 + args.tokens,), generator=g)

    def decode(batch: int, n: int) -> float:
        with torch.inference_mode():
            x = tokens[: 8 + n].expand(batch, -1)  # (B, 8 + n)
            _, state = model(x[:, :8])
            t = time.perf_counter()
            for i in range(n):
                _, state = model(x[:, 8 + i : 9 + i], state)
            return n * batch / (time.perf_counter() - t)

    out = {"rwkvkit": str(Path(rwkvkit.__file__).parents[1])}
    for batch in args.batches:
        n = args.tokens if batch == 1 else max(4, args.tokens // 4)
        decode(batch, 2)  # warm-up
        out[f"b{batch}"] = statistics.median(decode(batch, n) for _ in range(args.repeats))
    return out


def run_worker(tree: Path, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--path", str(path), "--tokens", str(args.tokens)]
    cmd += ["--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed in {tree}:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(out["rwkvkit"]).resolve() != tree.resolve():
        raise RuntimeError(f"worker imported rwkvkit from {out['rwkvkit']}, not from {tree}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, help="source tree A (its root holds rwkvkit/)")
    parser.add_argument("--after", type=Path, default=REPO, help="source tree B (default: this one)")
    parser.add_argument("--shape", default="L12-D768", choices=["L12-D768", "L24-D1024"])
    parser.add_argument("--versions", nargs="+", default=["7"], choices=["7", "6"])
    parser.add_argument("--formats", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="decode batch sizes")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per run at batch 1 (/4 above)")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree and checkpoint")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rwkvkit-bench"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.before is None:
        parser.error("--before is required: the source tree to compare against")
    trees = {"A": args.before.resolve(), "B": args.after.resolve()}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"A = {trees['A']}\nB = {trees['B']}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    results: dict[tuple, dict[str, list[dict]]] = {}
    for version in args.versions:
        paths = make_checkpoints(args.work_dir, args.shape, version)
        for fmt in args.formats:
            runs = results.setdefault((version, fmt), {"A": [], "B": []})
            for r in range(args.rounds):
                for name in "AB" if r % 2 == 0 else "BA":
                    runs[name].append(run_worker(trees[name], paths[fmt], args))
            print(f"  v{version} {fmt}: {args.rounds} rounds done", file=sys.stderr)

    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"decode tokens/s, {args.shape}, median of {args.rounds} processes x {args.repeats} runs")
    print("| version | format | batch | A tok/s | B tok/s | B / A | paired B / A (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for (version, fmt), runs in results.items():
        for batch in args.batches:
            a_runs = [run[f"b{batch}"] for run in runs["A"]]
            b_runs = [run[f"b{batch}"] for run in runs["B"]]
            a, b = statistics.median(a_runs), statistics.median(b_runs)
            paired = [rb / ra for ra, rb in zip(a_runs, b_runs, strict=True)]
            spread = f"{statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f})"
            print(f"| v{version} | {fmt} | {batch} | {a:.1f} | {b:.1f} | {b / a:.3f} | {spread} |")


if __name__ == "__main__":
    main()
