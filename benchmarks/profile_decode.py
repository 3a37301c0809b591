"""Where a decode step's time goes: the projection matrices against everything else.

For a checkpoint (fp32 .pth or a quantized .safetensors) it times one decode step (batch B, median of
5 runs of 12 steps), then the same step's projections alone (every matrix the step multiplies, head
included, called in a loop with inputs of the step's shapes, through the same code path), and prints
the bytes those read, the rate they read them at and the remainder: the small ops (mixes, norms,
low-rank matrices, the WKV state update) and Python. With ``--ops`` it adds torch's profiler table of
the step. Where the model decodes through the native step (rwkvkit.native), it also reads the library's
own phase timers over those steps: the packed products (rk_matmul, with the bytes they read and the
rate), the low-rank products and the WKV (RWKV-7), the rest of the C step (norms, token-shift mixes,
element-wise work), and the time outside the C call (Python, the embedding row, the state's tensors).
The explanations in benchmarks/RESULTS.md come from this script.

    python benchmarks/profile_decode.py model.pth model-int8.safetensors --batch 1 --ops
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
from torch import nn

from rwkvkit import native
from rwkvkit.blas import linear
from rwkvkit.models import load_model
from rwkvkit.models.common import _blas_matvecs, _one_torch_thread
from rwkvkit.native.step import step_for


def projection_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is nn.Linear or hasattr(m, "qweight")]


def bytes_read(layers: list[nn.Module]) -> int:
    """Bytes of the weights the products read (a quantized layer's packed form where it has one)."""
    total = 0
    for layer in layers:
        packed = getattr(layer, "_packed", None)
        if packed is not None:
            total += packed.numel() + layer._scales_zeros.numel() * 2
        else:
            total += sum(t.numel() * t.element_size() for t in [*layer.buffers(), *layer.parameters()])
    return total


def profile_model(path: str, batch: int, ops: bool) -> None:
    """Print the split of one decode step of ``path`` at ``batch`` (and the op table when ``ops``)."""
    model = load_model(path).eval()
    layers = projection_layers(model)
    inputs = [torch.randn(batch, layer.in_features) for layer in layers]
    tokens = torch.ones(batch, 1, dtype=torch.long)
    one_thread = batch == 1 and _blas_matvecs(model)  # as the model's own step does

    with torch.inference_mode():
        _, state = model(tokens)

        def step_ms() -> float:
            nonlocal state
            t = time.perf_counter()
            for _ in range(12):
                _, state = model(tokens, state)
            return (time.perf_counter() - t) / 12 * 1e3

        def products_ms() -> float:
            t = time.perf_counter()
            for layer, x in zip(layers, inputs, strict=True):
                linear(layer, x)
            return (time.perf_counter() - t) * 1e3

        step_ms()
        step = statistics.median(step_ms() for _ in range(5))
        if one_thread:
            with _one_torch_thread():
                products_ms()
                products = statistics.median(products_ms() for _ in range(5))
        else:
            products_ms()
            products = statistics.median(products_ms() for _ in range(5))
        nbytes = bytes_read(layers)
        print(
            f"{path} B={batch}: step {step:.1f} ms ({batch * 1e3 / step:.1f} tok/s); "
            f"{len(layers)} projections alone {products:.1f} ms ({nbytes / 1e6:.0f} MB at "
            f"{nbytes / products / 1e6:.1f} GB/s); everything else {step - products:.1f} ms"
        )
        if step_for(model) is not None:
            print_native_phases(model, tokens, state, nbytes)
        if ops:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(10):
                    _, state = model(tokens, state)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
            print("(profiler times are for 10 steps)")


def print_native_phases(model: nn.Module, tokens: torch.Tensor, state, nbytes: int, steps: int = 24) -> None:
    """The native step's phase timers (rwkvkit/native/src/native.h) over ``steps`` decode steps, per token."""
    lib = native.load()
    slots = (ctypes.c_double * 3)()
    lib.rk_profile_read(slots)  # zero them
    lib.rk_profile_enable(1)
    try:
        t = time.perf_counter()
        for _ in range(steps):
            _, state = model(tokens, state)
        wall = (time.perf_counter() - t) / steps * 1e3
    finally:
        lib.rk_profile_enable(0)
    lib.rk_profile_read(slots)
    products, mix, step = (v / steps * 1e3 for v in slots)
    rows = [("whole decode call", wall), ("  packed products (rk_matmul)", products)]
    if mix > 0:  # RWKV-7's step times these apart
        rows.append(("  low-rank products + WKV", mix))
    rows += [
        (
            "  rest of the C step (norms, mixes, element-wise" + ("" if mix > 0 else ", WKV") + ")",
            step - products - mix,
        ),
        ("  outside the C step (Python, embedding, state tensors)", wall - step),
    ]
    for name, ms in rows:
        print(f"    {name:56s} {ms:7.2f} ms  {ms / wall:6.1%}")
    print(f"    packed products read {nbytes / 1e6:.0f} MB a token at {nbytes / products / 1e6:.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="checkpoints (.pth or quantized .safetensors)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--ops", action="store_true", help="also print torch's profiler table of a step")
    args = parser.parse_args()
    for path in args.models:
        profile_model(path, args.batch, args.ops)


if __name__ == "__main__":
    main()
