"""``rwkvkit quantize``: write a checkpoint's projection matrices as int8 or int4 (:mod:`rwkvkit.quant`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rwkvkit.errors import RwkvkitError
from rwkvkit.models import load_model
from rwkvkit.quant import quantize_model, quantized_names, save_quantized
from rwkvkit.quant.layers import GROUP_SIZES, SCHEMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit quantize``."""
    parser.add_argument("model", metavar="MODEL", help="checkpoint to quantize (.pth or .safetensors)")
    parser.add_argument("--to", required=True, choices=SCHEMES, help="int8 (per channel) or int4 (per group)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        choices=GROUP_SIZES,
        help="int4: inputs per group sharing a scale and zero (default: %(default)s)",
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output file (.safetensors)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit quantize``."""
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RwkvkitError(f"the output must be a .safetensors file, got {out}")
    if out.resolve() == Path(args.model).resolve():
        raise RwkvkitError("the output would overwrite the input model")
    t0 = time.perf_counter()
    model = load_model(args.model)
    if getattr(model, "quantization", None) is not None:
        raise RwkvkitError(f"{args.model} is already quantized ({model.quantization['scheme']})")
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize_model(model, args.to, args.group_size)
    save_quantized(model, out)
    after = out.stat().st_size
    scheme = f"{args.to} (group size {args.group_size})" if args.to == "int4" else args.to
    print(
        f"wrote {out}: {scheme}, {len(quantized_names(model))} matrices quantized, "
        f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s"
    )
    return 0
