"""CPU inference benchmark: rwkvkit (fp32, int8, int4) against the reference ``rwkv`` package in one run.

For each released shape (L12-D768 and L24-D1024, vocabulary 65536) and version (7 and 6) it writes a
random checkpoint in the official layout and its int8 / int4 (group 64) quantizations, then measures in
fresh processes (so each peak RSS is its own):

- prefill tokens/s at T = 512 and 2048 (the reference's ``forward(tokens)``; rwkvkit's ``model(tokens)``,
  fp32 and, at T = 512, with ``--bf16-prefill``'s bf16 autocast; int8 / int4 at T = 512 only: their
  prefill already multiplies bf16 weights dequantized per call, so neither T = 2048 nor the bf16
  autocast adds more than minutes),
- decode tokens/s at batch 1 (one token per call, carried state), and rwkvkit's batched decode at
  batch 8 and 32,
- load time and peak RSS growth while decoding (RSS after loading and decoding, minus the process's RSS
  after importing torch and rwkvkit), against the weights' size in their stored format.

It also measures this machine's memory read bandwidth (the best of a 2-thread torch sum and a numpy
sum over 1 GiB: a copy would count the writes too and under-report it) and prints, per format, the
decode bound (bandwidth / bytes of weights read per token: every matrix and vector except the
embedding, of which one row is read) and the fraction of it reached. Medians of --repeats runs
(prefill at T = 512: of --prefill-repeats; T = 2048 is one run, long enough to be stable).

    python benchmarks/bench_infer.py                  # everything (under 10 minutes on 2 cores)
    python benchmarks/bench_infer.py --shapes L12-D768 --versions 7
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "L12-D768": dict(n_layer=12, n_embd=768, head_size=64),
    "L24-D1024": dict(n_layer=24, n_embd=1024, head_size=64),
}
# released low-rank widths (v7: decay, iclr, value, gate; v6: mix, decay)
V7_WIDTHS = {768: (64, 64, 32, 128), 1024: (64, 64, 32, 128)}
V6_WIDTHS = {768: (32, 64), 1024: (32, 64)}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """The peak RSS since the last :func:`reset_peak_rss` (Linux VmHWM), else since the start."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (writing 5 to /proc/self/clear_refs resets VmHWM on Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- workers


def reference_runners(args: argparse.Namespace, tokens: list[int]):
    """(prefill, decode, batched decoders) over the reference package's model."""
    from reference import reference_model

    model = reference_model(args.path, args.version)

    def run_prefill(n):
        model.forward(tokens[:n], None)

    def decode(n):
        _, state = model.forward(tokens[:8], None)
        t = time.perf_counter()
        for i in range(n):
            _, state = model.forward([tokens[8 + i]], state)
        return n / (time.perf_counter() - t)

    return run_prefill, decode, {}


def rwkvkit_runners(args: argparse.Namespace, tokens: list[int]):
    """(prefill, decode, batched decoders) over rwkvkit's model."""
    import torch

    from rwkvkit.infer.generate import prefill_precision
    from rwkvkit.models import load_model

    model = load_model(args.path)

    def run_prefill(n, bf16=False):
        with torch.inference_mode(), prefill_precision(model, bf16):
            model(torch.tensor([tokens[:n]]), last_only=True)

    def decode(n, batch=1):
        return rwkvkit_decode_speed(model, tokens, n, batch)

    return run_prefill, decode, {b: decode for b in args.batches if b > 0}


def rwkvkit_decode_speed(model, tokens: list[int], n: int, batch: int = 1) -> float:
    """Tokens/s of an rwkvkit model decoding ``n`` tokens, one per call, for ``batch`` copies of
    ``tokens`` after an 8-token prompt (carried state)."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([tokens[: 8 + n]] * batch)  # (batch, 8 + n)
        _, state = model(x[:, :8])
        t = time.perf_counter()
        for i in range(n):
            _, state = model(x[:, 8 + i : 9 + i], state)
        return n * batch / (time.perf_counter() - t)


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    baseline = rss_mb()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65536, (max(args.prefill) + args.decode_tokens + 1,), generator=g).tolist()
    out: dict = {}
    t0 = time.perf_counter()
    runners = reference_runners if args.impl == "reference" else rwkvkit_runners
    run_prefill, decode, batched = runners(args, tokens)
    out["load_s"] = time.perf_counter() - t0

    decode(2)  # warm-up
    reset_peak_rss()  # the peak RSS while decoding (loading's transient copies excluded)
    out["decode"] = statistics.median(decode(args.decode_tokens) for _ in range(args.repeats))
    out["rss_growth_mb"] = peak_rss_mb() - baseline
    for b, fn in batched.items():
        fn(1, b)  # warm-up
        out[f"decode_b{b}"] = statistics.median(fn(args.batch_tokens, b) for _ in range(args.repeats))

    def prefill_speed(n: int, **kw) -> float:
        times = []
        for _ in range(args.prefill_repeats if n <= 512 else 1):  # T = 2048 once: long enough to be stable
            t = time.perf_counter()
            run_prefill(n, **kw)
            times.append(time.perf_counter() - t)
        return n / statistics.median(times)

    for n in args.prefill:
        out[f"prefill_{n}"] = prefill_speed(n)
        if args.impl != "reference" and n <= 512 and not args.path.endswith(".safetensors"):
            out[f"prefill_{n}_bf16"] = prefill_speed(n, bf16=True)  # fp32 weights, T = 512 (10-min budget)
    return out


def run_worker(**kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker"]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- set-up


def bandwidth_gbs() -> float:
    """Memory read bandwidth: the best of a torch sum (all threads) and a numpy sum over 1 GiB."""
    import numpy as np
    import torch

    data = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32
    best = 0.0
    for fn in (torch.sum, lambda t: np.sum(t.numpy())):
        fn(data)
        for _ in range(3):
            t0 = time.perf_counter()
            fn(data)
            best = max(best, data.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_token(path: Path) -> int:
    """Bytes a decoding step reads: every stored tensor but the embedding (one row of it)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        itemsize = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}
        total = sum(
            itemsize[dtypes[k]] * int(torch.tensor(s).prod()) for k, s in sizes.items() if k != "emb.weight"
        )
        return total
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return sum(t.numel() * t.element_size() for k, t in sd.items() if k != "emb.weight")


def make_checkpoints(work: Path, shape: str, version: str) -> dict[str, Path]:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import random_state_dict

    from rwkvkit.models import load_model
    from rwkvkit.quant import quantize_model, save_quantized

    base = work / f"v{version}-{shape}.pth"
    if not base.exists():
        kw = dict(SHAPES[shape], vocab_size=65536, seed=0)
        C = kw["n_embd"]
        if version == "7":
            kw.update(zip(("d_decay", "d_iclr", "d_value", "d_gate"), V7_WIDTHS[C], strict=True))
        else:
            kw.update(zip(("d_mix", "d_decay"), V6_WIDTHS[C], strict=True))
        torch.save(random_state_dict(version, **kw), base)
    paths = {"fp32": base}
    for scheme in ("int8", "int4"):
        path = work / f"v{version}-{shape}-{scheme}.safetensors"
        if not path.exists():
            save_quantized(quantize_model(load_model(base), scheme, group_size=64), path)
        paths[scheme] = path
    return paths


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--versions", nargs="+", default=["7", "6"], choices=["7", "6"])
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per measurement (median shown)")
    parser.add_argument("--prefill-repeats", type=int, default=2, help="prefill runs at T = 512 (median)")
    parser.add_argument("--decode-tokens", type=int, default=10, help="tokens per batch-1 decode run")
    parser.add_argument("--batch-tokens", type=int, default=3, help="steps per batched decode run")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batched decode sizes")
    parser.add_argument("--work-dir", default=None, help="where the checkpoints go (default: a temp dir)")
    # internal: one measurement in a fresh process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="rwkvkit", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--version", default="7", help=argparse.SUPPRESS)
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rwkvkit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    bw = bandwidth_gbs()
    print(f"# rwkvkit inference benchmark, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(f"# memory read bandwidth: {bw:.1f} GB/s (best of torch / numpy sums over 1 GiB)")
    print(f"# medians of {args.repeats} decode runs ({args.decode_tokens} tokens at batch 1, "
          f"{args.batch_tokens} steps batched) and {args.prefill_repeats} prefill runs at T = 512; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print()
    print("| model | impl | weights MB | load s | prefill 512 tok/s | prefill 2048 | decode B=1 tok/s | "
          "bound tok/s | of bound | B=8 tok/s | B=32 tok/s | decode RSS growth MB |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        for version in args.versions:
            paths = make_checkpoints(work, shape, version)
            os.sync()  # new files' write-back would otherwise run beside the first measurements
            rows = [("reference fp32", "reference", paths["fp32"])] + [
                (f"rwkvkit {fmt}", "rwkvkit", paths[fmt]) for fmt in ("fp32", "int8", "int4")
            ]
            ref_decode = None
            for label, impl, path in rows:
                batches = args.batches if impl == "rwkvkit" else []
                quantized = path.suffix == ".safetensors"
                speed = run_worker(
                    impl=impl, path=path, version=version, decode_tokens=args.decode_tokens,
                    batch_tokens=args.batch_tokens, repeats=args.repeats,
                    prefill_repeats=args.prefill_repeats, batches=batches or [0],
                    prefill=[512] if quantized else [512, 2048],
                )  # fmt: skip
                nbytes = weight_bytes_per_token(path)
                bound = bw * 1e9 / nbytes
                stored_mb = path.stat().st_size / 1e6
                if impl == "reference":
                    ref_decode = speed["decode"]
                ratio = "" if impl == "reference" else f" ({speed['decode'] / ref_decode:.2f}x ref)"
                pre512 = f"{speed['prefill_512']:.0f}"
                pre2048 = f"{speed['prefill_2048']:.0f}" if "prefill_2048" in speed else "-"
                if "prefill_512_bf16" in speed:
                    pre512 += f" / bf16 {speed['prefill_512_bf16']:.0f}"
                b8 = f"{speed.get('decode_b8', float('nan')):.1f}" if impl != "reference" else "-"
                b32 = f"{speed.get('decode_b32', float('nan')):.1f}" if impl != "reference" else "-"
                growth = speed["rss_growth_mb"]
                print(
                    f"| v{version} {shape} | {label} | {stored_mb:,.0f} | {speed['load_s']:.1f} | {pre512} | "
                    f"{pre2048} | {speed['decode']:.1f}{ratio} | {bound:.0f} | "
                    f"{speed['decode'] / bound:.0%} | {b8} | {b32} | "
                    f"{growth:,.0f} ({growth / stored_mb:.2f}x) |",
                    flush=True,
                )
    print()
    print(f"# total {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
