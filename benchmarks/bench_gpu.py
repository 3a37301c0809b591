"""rwkvkit on one NVIDIA GPU, in one short run: the WKV kernels, decode and training, one table and one JSON.

    python benchmarks/bench_gpu.py [--json PATH] [--budget-s 280]

1. correctness: every WKV implementation there is (rwkvkit's chunked pure-PyTorch form, fla's chunk
   kernels, rwkvkit's Triton kernel), bf16 and fp32 inputs, against the float64 step-by-step reference:
   the largest error of the output, the final state and every gradient (initial state included), each
   relative to the reference's largest magnitude;
2. the operators at (B, T, H, N) = (8, 4096, 32, 64), (8, 4096, 64, 64), (1, 32768, 32, 64): forward and
   forward + backward time (median of CUDA-event timings) and peak memory above the inputs;
3. decode: one token for B = 1, 64, 256 sequences of a RWKV-7 L12-D768 (bf16 weights), eager and replayed
   from a CUDA graph (rwkvkit.infer.cuda_graph);
4. training: tokens/s and MFU of RWKV-7 L12-D768 and L24-D2048 at ctx 4096 (bf16 autocast, fp32
   weights, fused AdamW), with each WKV implementation for L12 and the fastest for L24, and
   torch.compile of L12 if the time budget leaves room. MFU counts 6 x (parameters outside the
   embedding) FLOPs per token (the WKV recurrence itself is left out, so MFU is slightly understated)
   against the H100/H200 SXM datasheet's 989 dense bf16 TFLOP/s.

Every stage checks the time budget first and records "skipped (time budget)" when it has run out, so the
whole run fits a short lease. With --smoke it runs tiny shapes on whatever device there is (the CPU
here) to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rwkvkit.wkv as wkv  # noqa: E402
from rwkvkit.models import new_model  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM datasheet, dense bf16
OP_SHAPES = [(8, 4096, 32, 64), (8, 4096, 64, 64), (1, 32768, 32, 64)]
SMOKE_SHAPES = [(1, 70, 2, 16)]


class Budget:
    """The run's time budget: stages ask ``left()`` before they start."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory ``fn()`` allocates above what was allocated before, in MiB (GPU only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------------ the operators


def op_inputs(name: str, B: int, T: int, H: int, N: int, device, dtype, seed: int = 0) -> list[torch.Tensor]:
    """Inputs in the ranges the models produce (RWKV-7: -w < exp(-0.5), a = -kk, b = kk * iclr)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = (randn(B, T, H, N) * 0.5 for _ in range(3))
    if name == "wkv7":
        w = -torch.exp(-F.softplus(-randn(B, T, H, N)) - 0.5)
        kk = F.normalize(randn(B, T, H, N), dim=-1)
        a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
        tensors = [r, w, k, v, a, b]
    else:
        w = -torch.exp(randn(B, T, H, N) * 0.5 - 2.0)
        tensors = [r, w, k, v, randn(H, N) * 0.5]
    return [x.to(device=device, dtype=dtype) for x in tensors]


def run_op(name: str, tensors, state, impl: str):
    fn = wkv.wkv7 if name == "wkv7" else wkv.wkv6
    return fn(*tensors, state, impl=impl)


def implementations(name: str, tensors, state) -> list[str]:
    """The implementations that can run these inputs here: chunked always, then the fused ones."""
    op = next(o for o in wkv.OPS if o.name == name)
    impls = ["chunked"]
    for form in op.fused:
        if form.unavailable(tensors, state) is None:
            impls.append(form.name)
    return impls


def unavailable_reasons(name: str, tensors, state) -> dict[str, str]:
    op = next(o for o in wkv.OPS if o.name == name)
    reasons = {}
    for form in op.fused:
        why = form.unavailable(tensors, state)
        if why is not None:
            reasons[form.name] = why
    return reasons


def forward_backward(name: str, tensors, state, impl: str, gy, gs):
    """y, final state and the gradients of every input and of the initial state."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    s0 = state.detach().clone().requires_grad_()
    y, s = run_op(name, leaves, s0, impl)
    torch.autograd.backward([y.float(), s.float()], [gy.to(y.device), gs.to(s.device)])
    return [y.detach(), s.detach()] + [x.grad for x in leaves] + [s0.grad]


def check_correctness(name: str, device, smoke: bool) -> list[dict]:
    B, T, H, N = (1, 37, 2, 16) if smoke else (2, 300, 4, 64)
    rows = []
    labels = ["y", "state"] + (
        ["dr", "dw", "dk", "dv", "da", "db"] if name == "wkv7" else ["dr", "dw", "dk", "dv", "du"]
    )
    labels.append("dstate0")
    g = torch.Generator(device="cpu").manual_seed(1)
    state64 = (torch.randn(B, H, N, N, generator=g) * 0.1).to(device, torch.float64)
    gy = torch.randn(B, T, H, N, generator=g).to(device)
    gs = torch.randn(B, H, N, N, generator=g).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        tensors = op_inputs(name, B, T, H, N, device, dtype)
        state = state64.float()
        want = forward_backward(
            name, [x.double() for x in tensors], state64, "reference", gy.double(), gs.double()
        )
        for impl in implementations(name, tensors, state):
            row = {"op": name, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "shape": [B, T, H, N]}
            try:
                got = forward_backward(name, tensors, state, impl, gy, gs)
                errors = {
                    label: float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                    for label, x, ref in zip(labels, got, want, strict=True)
                }
                row.update(
                    max_rel_err_y=errors["y"],
                    max_rel_err_state=errors["state"],
                    max_rel_err_grads=max(v for k, v in errors.items() if k.startswith("d")),
                    errors=errors,
                )
            except Exception as e:  # a kernel that fails is a result to report, not the end of the run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    return rows


CHUNKED_Y: dict = {}  # (op, shape, dtype) -> the chunked form's y, for the fused kernels to match


def bench_op(name: str, shape, device, dtype, impl: str, reps: int) -> dict:
    B, T, H, N = shape
    tensors = op_inputs(name, B, T, H, N, device, dtype)
    row = {"op": name, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape)}
    try:
        with torch.no_grad():
            y, _ = run_op(name, tensors, None, impl)
            if impl == "chunked":
                CHUNKED_Y[(name, tuple(shape), dtype)] = y.float()
            ref = CHUNKED_Y.get((name, tuple(shape), dtype))
            if ref is not None:  # the long sequence: the fused kernels against the chunked form's output
                row["rel_diff_y_vs_chunked"] = float((y.float() - ref).abs().max() / ref.abs().max())
            del y
            row["fwd_ms"] = time_ms(lambda: run_op(name, tensors, None, impl), device, reps)
            row["fwd_peak_mib"] = peak_mib(lambda: run_op(name, tensors, None, impl), device)
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        gy = torch.randn(B, T, H, N, device=device, dtype=dtype)

        def step():
            y, _ = run_op(name, leaves, None, impl)
            y.backward(gy.to(y.dtype))
            for x in leaves:
                x.grad = None

        row["fwd_bwd_ms"] = time_ms(step, device, reps)
        row["fwd_bwd_peak_mib"] = peak_mib(step, device)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------ decode


def decode_row(model, B: int, V: int, device, reps: int) -> dict:
    """Step times of one batch size: forward() (token checks included), decode_step, the CUDA graph."""
    from rwkvkit.infer.cuda_graph import CUDAGraphDecoder

    row = {"model": f"L{model.config.n_layer}-D{model.config.n_embd}", "batch": B, "dtype": "bfloat16"}
    tokens = torch.randint(0, V, (B, 1), device=device)
    with torch.no_grad():
        state = model.initial_state(B)
        row["eager_forward_ms"] = time_ms(lambda: model(tokens, state), device, reps)
        row["eager_decode_step_ms"] = time_ms(lambda: model.decode_step(tokens, state), device, reps)
        if device.type == "cuda":
            try:
                graph = CUDAGraphDecoder(model, B)
                row["graph_ms"] = time_ms(lambda: graph.step(tokens, state, check=False), device, reps)
                want, want_state = model.decode_step(tokens, state)
                got, got_state = graph.step(tokens, state)
                row["graph_max_abs_diff_logits"] = float((got - want[:, 0]).abs().max())
                row["graph_max_abs_diff_state"] = float((got_state.wkv - want_state.wkv).abs().max())
            except Exception as e:
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    row["tokens_per_s_best"] = B * 1e3 / min(v for k, v in row.items() if k.endswith("_ms"))
    return row


def engine_with_graphs_matches(model, device) -> dict:
    """Greedy text of 6 prompts through the engine, with and without CUDA graphs: the same tokens (uneven
    lengths: the batch shrinks, so several graph sizes run)."""
    from rwkvkit.infer.engine import Engine, FinishEvent
    from rwkvkit.infer.sampling import SamplingParams
    from rwkvkit.tokenizer import load_tokenizer

    tok = load_tokenizer("world" if model.config.vocab_size == 65536 else "byte")
    prompts = [tok.encode("The quick brown fox. " * (1 + 2 * i)) for i in range(6)]

    def run(graphs: bool) -> tuple[list[list[int]], float]:
        engine = Engine(model, tok, max_batch=8, cuda_graphs=graphs)
        finished: list[FinishEvent] = []
        for i, p in enumerate(prompts):
            engine.submit(
                p, SamplingParams(temperature=0), max_tokens=16 + 4 * i, stop_tokens=(),
                on_event=lambda e: finished.append(e) if isinstance(e, FinishEvent) else None,
            )  # fmt: skip
        t0 = time.perf_counter()
        engine.run_until_idle()
        sync(device)
        return [e.tokens for e in sorted(finished, key=lambda e: e.prompt_tokens)], time.perf_counter() - t0

    run(True)  # records the graphs
    eager, eager_s = run(False)
    graphed, graphed_s = run(True)
    return {"engine_same_tokens": eager == graphed, "engine_eager_s": eager_s, "engine_graphs_s": graphed_s}


def bench_decode(device, batch_sizes, smoke: bool, reps: int) -> list[dict]:
    L, D, V = (2, 64, 1000) if smoke else (12, 768, 65536)
    torch.manual_seed(0)
    model = new_model("7", L, D, V, 16 if smoke else 64, device=device).to(torch.bfloat16).eval()
    rows = [decode_row(model, B, V, device, reps) for B in batch_sizes]
    if device.type == "cuda":
        try:
            rows.append({"model": f"L{L}-D{D}", "engine": engine_with_graphs_matches(model, device)})
        except Exception as e:
            rows.append({"model": f"L{L}-D{D}", "engine": {"error": f"{type(e).__name__}: {e}"[:300]}})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- training


def bench_train(device, L: int, D: int, B: int, T: int, impl: str, steps: int, compile_model: bool) -> dict:
    V = 65536 if T >= 1024 else 1000
    row = {"model": f"L{L}-D{D}", "batch": B, "ctx": T, "wkv": impl, "compile": compile_model}
    model = None
    try:
        torch.manual_seed(0)
        model = new_model("7", L, D, V, 64 if D >= 256 else 16, device=device)
        params = sum(p.numel() for p in model.parameters())
        flops_per_token = 6 * (params - model.emb.weight.numel())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model) if compile_model else model
        x = torch.randint(0, V, (B, T + 1), device=device)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )

        def step():
            with autocast, wkv.use_impl(impl):
                logits, _ = forward(x[:, :-1])
                loss = F.cross_entropy(logits.view(-1, V), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        t0 = time.monotonic()
        step()
        sync(device)
        row["first_step_s"] = time.monotonic() - t0  # compilation included
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = time_ms(step, device, reps=steps, warmup=1)
        row.update(
            params_m=params / 1e6,
            step_ms=ms,
            tokens_per_s=B * T * 1e3 / ms,
            mfu=flops_per_token * B * T * 1e3 / ms / PEAK_BF16_FLOPS,
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        )
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------ report


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("triton", "fla"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # not installed, or broken: say which
            out[pkg] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return out


def fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def print_tables(result: dict) -> None:
    print("\n== versions:", json.dumps(result["versions"]))
    print("\n== correctness vs float64 reference (max |err| / max |ref|)")
    print(f"{'op':6} {'impl':8} {'dtype':9} {'y':>9} {'state':>9} {'grads':>9}")
    for r in result["correctness"]:
        if "error" in r:
            print(f"{r['op']:6} {r['impl']:8} {r['dtype']:9} ERROR {r['error']}")
        else:
            print(
                f"{r['op']:6} {r['impl']:8} {r['dtype']:9} {r['max_rel_err_y']:9.2e} "
                f"{r['max_rel_err_state']:9.2e} {r['max_rel_err_grads']:9.2e}"
            )
    for name, why in result.get("unavailable", {}).items():
        print(f"  not run: {name}: {why}")
    print("\n== operators: ms (median) and peak MiB above the inputs")
    print(
        f"{'op':6} {'shape':20} {'impl':8} {'dtype':9} {'fwd ms':>9} {'f+b ms':>9} "
        f"{'fwd MiB':>9} {'f+b MiB':>9} {'y vs chunked':>12}"
    )
    for r in result["operators"]:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r or "skipped" in r:
            print(f"{r['op']:6} {shape:20} {r['impl']:8} {r['dtype']:9} {r.get('error') or r.get('skipped')}")
            continue
        print(
            f"{r['op']:6} {shape:20} {r['impl']:8} {r['dtype']:9} {fmt(r['fwd_ms'], '9.2f')} "
            f"{fmt(r['fwd_bwd_ms'], '9.2f')} {fmt(r['fwd_peak_mib'], '9.0f')} "
            f"{fmt(r['fwd_bwd_peak_mib'], '9.0f')} {fmt(r.get('rel_diff_y_vs_chunked'), '12.2e')}"
        )
    print("\n== decode: ms per step (one token for each of B sequences)")
    print(
        f"{'model':10} {'B':>5} {'forward()':>10} {'decode_step':>12} {'CUDA graph':>11} {'best tok/s':>11}"
    )
    for r in result["decode"]:
        if "engine" in r:
            print(f"  engine, greedy, 6 prompts, with / without CUDA graphs: {r['engine']}")
            continue
        if "skipped" in r:
            print(f"{r.get('model', '-'):10} {r.get('batch', '-'):>5} {r['skipped']}")
            continue
        graph = fmt(r.get("graph_ms"), "11.3f") if "graph_error" not in r else "error"
        print(
            f"{r['model']:10} {r['batch']:>5} {fmt(r['eager_forward_ms'], '10.3f')} "
            f"{fmt(r['eager_decode_step_ms'], '12.3f')} {graph:>11} {fmt(r['tokens_per_s_best'], '11.0f')}"
        )
        if "graph_error" in r:
            print(f"  graph: {r['graph_error']}")
    print("\n== training (bf16 autocast, fp32 weights, AdamW)")
    print(
        f"{'model':10} {'B':>3} {'ctx':>6} {'wkv':8} {'compile':8} {'step ms':>9} {'tok/s':>9} "
        f"{'MFU':>6} {'GiB':>6}"
    )
    for r in result["training"]:
        if "error" in r or "skipped" in r:
            print(
                f"{r['model']:10} {r['batch']:>3} {r['ctx']:>6} {r['wkv']:8} {r['compile']!s:8} "
                f"{r.get('error') or r.get('skipped')}"
            )
            continue
        print(
            f"{r['model']:10} {r['batch']:>3} {r['ctx']:>6} {r['wkv']:8} {r['compile']!s:8} "
            f"{r['step_ms']:9.1f} "
            f"{r['tokens_per_s']:9.0f} {r['mfu'] * 100:5.1f}% {fmt(r['peak_gib'], '6.1f')}"
        )
    print(f"\ntotal {result['elapsed_s']:.0f} s")


def stamp(budget: Budget, what: str) -> None:
    print(f"[{budget.seconds - budget.left():5.0f} s] {what}", flush=True)


def skipped(row: dict) -> dict:
    return {**row, "skipped": "time budget"}


def stage_correctness(result: dict, device, smoke: bool, budget: Budget) -> None:
    for name in ("wkv7", "wkv6"):
        result["correctness"] += check_correctness(name, device, smoke)
        probe = op_inputs(name, 1, 8, 1, 64, device, torch.bfloat16)
        for impl, why in unavailable_reasons(name, probe, None).items():
            result.setdefault("unavailable", {})[f"{name}/{impl}"] = why
        stamp(budget, f"correctness {name} done")


def stage_operators(result: dict, device, smoke: bool, budget: Budget, reps: int, save) -> None:
    for name in ("wkv7", "wkv6"):
        for shape in SMOKE_SHAPES if smoke else OP_SHAPES:
            for dtype in (torch.bfloat16, torch.float32):
                probe = op_inputs(name, 1, 8, shape[2], shape[3], device, dtype)
                for impl in implementations(name, probe, None):
                    row = {"op": name, "impl": impl, "dtype": str(dtype)[6:], "shape": list(shape)}
                    if budget.left() < 150:
                        result["operators"].append(skipped(row))
                        continue
                    result["operators"].append(bench_op(name, shape, device, dtype, impl, reps))
                    stamp(budget, f"{name} {shape} {dtype} {impl}")
                CHUNKED_Y.clear()
            save()


def stage_training(result: dict, device, smoke: bool, budget: Budget, save) -> None:
    small = (2, 64, 2, 128) if smoke else (12, 768, 8, 4096)
    large = (2, 64, 2, 128) if smoke else (24, 2048, 2, 4096)

    def header(shape, impl, compiled):
        return {"model": f"L{shape[0]}-D{shape[1]}", "batch": shape[2], "ctx": shape[3], "wkv": impl,
                "compile": compiled}  # fmt: skip

    probe = op_inputs("wkv7", 1, 8, 1, 64, device, torch.bfloat16)
    for impl in implementations("wkv7", probe, None):
        if budget.left() < 60:
            result["training"].append(skipped(header(small, impl, False)))
            continue
        result["training"].append(bench_train(device, *small, impl, 3, False))
        stamp(budget, f"train {header(small, impl, False)['model']} {impl}")
        save()
    done = [r for r in result["training"] if "tokens_per_s" in r]
    best = max(done, key=lambda r: r["tokens_per_s"])["wkv"] if done else "chunked"
    if budget.left() > 45:
        result["training"].append(bench_train(device, *large, best, 3, False))
        stamp(budget, f"train {header(large, best, False)['model']} {best}")
    else:
        result["training"].append(skipped(header(large, best, False)))
    save()
    if budget.left() > 120 and not smoke:
        result["training"].append(bench_train(device, *small, best, 3, True))
        stamp(budget, "train compiled")
    else:
        result["training"].append(skipped(header(small, best, True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        default=None,
        help="results file (default: $OUT/bench_gpu.json, else benchmarks/bench_gpu.json)",
    )
    parser.add_argument("--budget-s", type=float, default=280.0, help="stop starting new stages after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench_gpu.py needs a CUDA GPU (use --smoke to check the script on the CPU)")
    budget = Budget(args.budget_s)
    out_dir = os.environ.get("OUT")
    default = Path(out_dir) / "bench_gpu.json" if out_dir else Path(__file__).parent / "bench_gpu.json"
    path = Path(args.json) if args.json else default
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training run uses
    result: dict = {"versions": versions(), "correctness": [], "operators": [], "decode": [], "training": []}

    def save() -> None:
        result["elapsed_s"] = budget.seconds - budget.left()
        path.write_text(json.dumps(result, indent=1))

    stage_correctness(result, device, args.smoke, budget)
    save()
    stage_operators(result, device, args.smoke, budget, args.reps, save)
    if budget.left() > 110:
        batch_sizes = (1, 4) if args.smoke else (1, 64, 256)
        result["decode"] = bench_decode(device, batch_sizes, args.smoke, max(args.reps, 10))
    else:
        result["decode"] = [{"skipped": "time budget"}]
    stamp(budget, "decode done")
    save()
    stage_training(result, device, args.smoke, budget, save)
    save()
    print_tables(result)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
