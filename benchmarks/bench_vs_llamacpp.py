"""CPU decode and prefill of rwkvkit beside llama.cpp (llama-cpp-python) and the reference ``rwkv`` package.

For each shape and version it writes a random checkpoint in the official layout (the same ones as
``bench_infer.py``), rwkvkit's int8 / int4 quantizations of it, and GGUF exports (F32, BF16, Q8_0,
Q4_0, through ``rwkvkit export``'s library code). Then, in fresh processes with the same thread count,
interleaved over ``--rounds`` (each round runs every engine once, the order rotating), it measures:

- decode tokens/s at batch 1 (one token per call, carried state) for each format pair
  (fp32 / F32, bf16 / BF16, int8 / Q8_0, int4 / Q4_0; the reference package in fp32),
- prefill tokens/s at T = 512 (one call over the prompt),
- rwkvkit's batched decode at batch 32 (llama-cpp-python's high-level API decodes one sequence),
- the peak resident memory growth while decoding, against the weights' stored size.

The table shows medians over rounds and the ratio rwkvkit / llama.cpp, with the load average.
llama-cpp-python is installed on first use (it builds llama.cpp from source, the library only: ~7
minutes on 2 cores) from a wheel cached in ``~/.cache/rwkvkit/wheels`` (built once, reused after);
``--no-llamacpp`` skips the peer.

    python benchmarks/bench_vs_llamacpp.py                         # v7 L12-D768, 3 rounds
    python benchmarks/bench_vs_llamacpp.py --versions 7 6 --shapes L12-D768 L24-D1024
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

from bench_infer import (  # noqa: E402
    make_checkpoints,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    rwkvkit_decode_speed,
)

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_CMAKE_FLAGS = (
    "GGML_NATIVE=ON",
    "LLAMA_BUILD_TESTS=OFF",
    "LLAMA_BUILD_EXAMPLES=OFF",
    "LLAMA_BUILD_TOOLS=OFF",
    "LLAMA_BUILD_SERVER=OFF",
    "LLAVA_BUILD=OFF",
)
WHEELS = Path(os.environ.get("RWKVKIT_CACHE", Path.home() / ".cache" / "rwkvkit")) / "wheels"
# (rwkvkit format, GGUF type) pairs compared with each other
FORMATS = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


# ---------------------------------------------------------------------------------------------- workers


def rwkvkit_worker(args: argparse.Namespace, tokens: list[int]) -> dict:
    import torch

    from rwkvkit.models import load_model
    from rwkvkit.native.step import step_for

    dtype = torch.bfloat16 if args.format == "bf16" else torch.float32
    model = load_model(args.path, dtype=dtype)
    out = {"native": step_for(model) is not None}

    def decode(n: int, batch: int = 1) -> float:
        return rwkvkit_decode_speed(model, tokens, n, batch)

    def prefill(n: int) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            model(torch.tensor([tokens[:n]]), last_only=True)
            return n / (time.perf_counter() - t)

    return measure(out, decode, prefill, batched=True, args=args)


def llamacpp_worker(args: argparse.Namespace, tokens: list[int]) -> dict:
    from llama_cpp import Llama

    n_ctx = max(args.prefill, 8 + args.decode_tokens) + 16
    llm = Llama(
        model_path=str(args.path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=n_ctx,
        n_batch=args.prefill, verbose=False,
    )  # fmt: skip

    def decode(n: int, batch: int = 1) -> float:
        llm.reset()
        llm.eval(tokens[:8])
        t = time.perf_counter()
        for i in range(n):
            llm.eval([tokens[8 + i]])
        return n / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens[:n])
        return n / (time.perf_counter() - t)

    return measure({}, decode, prefill, batched=False, args=args)


def reference_worker(args: argparse.Namespace, tokens: list[int]) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from reference import reference_model

    model = reference_model(str(args.path), args.version)

    def decode(n: int, batch: int = 1) -> float:
        _, state = model.forward(tokens[:8], None)
        t = time.perf_counter()
        for i in range(n):
            _, state = model.forward([tokens[8 + i]], state)
        return n / (time.perf_counter() - t)

    def prefill(n: int) -> float:
        t = time.perf_counter()
        model.forward(tokens[:n], None)
        return n / (time.perf_counter() - t)

    return measure({}, decode, prefill, batched=False, args=args)


def measure(out: dict, decode, prefill, batched: bool, args: argparse.Namespace) -> dict:
    """Decode at batch 1 (median of --repeats), peak RSS growth, prefill, and batch 32 where offered."""
    decode(2)  # warm-up
    reset_peak_rss()
    out["decode"] = statistics.median(decode(args.decode_tokens) for _ in range(args.repeats))
    out["rss_growth_mb"] = peak_rss_mb() - args.baseline_rss
    prefill(16)  # warm-up
    out["prefill"] = statistics.median(prefill(args.prefill) for _ in range(2))
    if batched:
        decode(1, 32)
        out["decode_b32"] = statistics.median(decode(args.batch_tokens, 32) for _ in range(2))
    return out


def worker(args: argparse.Namespace) -> dict:
    import torch

    args.baseline_rss = rss_mb()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 65536, (max(args.prefill, 8 + args.decode_tokens) + 1,), generator=g).tolist()
    run = {"rwkvkit": rwkvkit_worker, "llama.cpp": llamacpp_worker, "reference": reference_worker}
    return run[args.engine](args, tokens)


def run_worker(engine: str, path: Path, fmt: str, version: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--path", str(path), "--format", fmt]
    cmd += ["--version-of-model", version, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--decode-tokens", str(args.decode_tokens), "--prefill", str(args.prefill)]
    cmd += ["--batch-tokens", str(args.batch_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} {fmt} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- set-up


def ensure_llama_cpp() -> bool:
    """llama-cpp-python importable, installing it from the cached wheel (built once) if needed."""
    try:
        import llama_cpp  # noqa: F401

        return True
    except ImportError:
        pass
    WHEELS.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if not list(WHEELS.glob("llama_cpp_python-*.whl")):
        print(f"building {LLAMA_CPP_PYTHON} once into {WHEELS} (llama.cpp from source, ~7 min on 2 cores)")
        t = time.perf_counter()
        env = dict(os.environ)
        # the library only, for this CPU: no tools, examples, tests, server or multimodal library
        env.setdefault("CMAKE_ARGS", " ".join(f"-D{flag}" for flag in LLAMA_CPP_CMAKE_FLAGS))
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([*pip, "wheel", "--no-deps", LLAMA_CPP_PYTHON, "-w", str(WHEELS)], check=True, env=env)
        print(f"  built in {time.perf_counter() - t:.0f} s")
    wheel = sorted(WHEELS.glob("llama_cpp_python-*.whl"))[-1]
    subprocess.run([*pip, "install", "-q", str(wheel), "diskcache", "jinja2", "numpy"], check=True)
    return True


def make_files(work: Path, shape: str, version: str, gguf: bool) -> dict[tuple[str, str], Path]:
    """(engine, format) -> file: rwkvkit's checkpoints and their GGUF exports."""
    from rwkvkit.export.gguf import export_gguf

    paths = make_checkpoints(work, shape, version)
    files = {("rwkvkit", f): paths["fp32" if f == "bf16" else f] for f in FORMATS}
    files[("reference", "fp32")] = paths["fp32"]
    if gguf:
        for fmt, gtype in FORMATS.items():
            out = work / f"v{version}-{shape}-{gtype}.gguf"
            if not out.exists():
                export_gguf(paths["fp32"], out, gtype)
            files[("llama.cpp", fmt)] = out
    return files


def stored_mb(path: Path, fmt: str) -> float:
    """The weights' stored size (bf16: half the fp32 file, as an official bf16 checkpoint holds them)."""
    size = path.stat().st_size / 2**20
    return size / 2 if fmt == "bf16" and path.suffix == ".pth" else size


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["L12-D768"], choices=["L12-D768", "L24-D1024"])
    parser.add_argument("--versions", nargs="+", default=["7"], choices=["7", "6"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per engine and format")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per process (median)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode run at batch 1")
    parser.add_argument("--batch-tokens", type=int, default=8, help="tokens per batch-32 decode run")
    parser.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every engine")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp (no build, no install)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference rwkv package")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rwkvkit-bench"), help="checkpoints here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--version-of-model", dest="version", help=argparse.SUPPRESS)
    return parser.parse_args()


def print_table(results: dict, files: dict) -> None:
    def med(key, field):
        vals = [r[field] for r in results.get(key, []) if field in r]
        return statistics.median(vals) if vals else None

    def cell(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    print("| model | format | rwkvkit decode | llama.cpp decode | ratio | rwkvkit prefill 512 | llama.cpp "
          "prefill | ratio | rwkvkit b32 | b32 / b1 | RSS / stored (rwkvkit, llama.cpp) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, fmt in sorted({(m, f) for (m, e, f) in results if e == "rwkvkit"}):
        r, g = (model, "rwkvkit", fmt), (model, "llama.cpp", fmt)
        dr, dg = med(r, "decode"), med(g, "decode")
        pr, pg = med(r, "prefill"), med(g, "prefill")
        b32 = med(r, "decode_b32")
        mem = []
        for key in (r, g):
            growth = med(key, "rss_growth_mb")
            path = files.get(key)
            mem.append("-" if growth is None or path is None else f"{growth / stored_mb(path, fmt):.2f}")
        print(
            f"| {model} | {fmt}/{FORMATS[fmt].upper()} | {cell(dr)} | {cell(dg)} | {ratio(dr, dg)} | "
            f"{cell(pr)} | {cell(pg)} | {ratio(pr, pg)} | {cell(b32)} | {ratio(b32, dr)} | {', '.join(mem)} |"
        )
    for model in sorted({k[0] for k in results}):
        ref = med((model, "reference", "fp32"), "decode")
        if ref is not None:
            print(f"reference rwkv 0.8.32 fp32 ({model}): decode {ref:.1f} tok/s, prefill "
                  f"{cell(med((model, 'reference', 'fp32'), 'prefill'))} tok/s")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    peer = not args.no_llamacpp and ensure_llama_cpp()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; threads {args.threads}")
    jobs, files = [], {}
    for shape in args.shapes:
        for version in args.versions:
            model = f"v{version}-{shape}"
            for (engine, fmt), path in make_files(args.work_dir, shape, version, peer).items():
                if fmt in args.formats and not (engine == "reference" and args.no_reference):
                    jobs.append((model, engine, fmt, version, path))
                    files[(model, engine, fmt)] = path
    results: dict = {}
    for round_ in range(args.rounds):
        order = jobs[round_ % len(jobs) :] + jobs[: round_ % len(jobs)]  # rotate: no engine always first
        for model, engine, fmt, version, path in order:
            results.setdefault((model, engine, fmt), []).append(run_worker(engine, path, fmt, version, args))
        print(f"  round {round_ + 1} of {args.rounds} done")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\ntokens/s, median of {args.rounds} processes; decode at batch 1, prefill T = {args.prefill}")
    print_table(results, files)


if __name__ == "__main__":
    main()
