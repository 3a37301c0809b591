"""``rwkvkit export``: write a checkpoint in another runtime's format: GGUF for llama.cpp (RWKV-6 and RWKV-7,
:mod:`rwkvkit.export.gguf`) or a Hugging Face folder in the layout its version uses on the Hub (every
version, :mod:`rwkvkit.export.hf`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rwkvkit.errors import RwkvkitError

FORMATS = ("gguf", "hf")
# The same values as rwkvkit.export.gguf.TYPES (repeated so that --help does not import torch).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

HF_DTYPES = ("keep", "fp32", "bf16", "fp16")

DESCRIPTION = (
    "Export a checkpoint (a .pth / .safetensors file, or a Hugging Face folder). --to gguf: a GGUF file "
    "for llama.cpp (architectures 'rwkv6' and 'rwkv7'; RWKV-4 and RWKV-5.2 have no llama.cpp architecture "
    "and are refused; needs pip install 'rwkvkit[gguf]'). --to hf: a Hugging Face folder (config.json, "
    "model.safetensors, tokenizer files) in the layout the version uses on the Hub: RWKV-4 as "
    "transformers' RwkvForCausalLM, RWKV-5.2 / 6 as the RWKV/v5-Eagle / v6-Finch HF layout, RWKV-7 as "
    "flash-linear-attention's RWKV7ForCausalLM (fla-hub); rwkvkit loads such folders back unchanged."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit export``."""
    parser.description = DESCRIPTION
    parser.add_argument(
        "model", metavar="MODEL", help="checkpoint to export (.pth or .safetensors, fp32 / bf16 / fp16)"
    )
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format: gguf (llama.cpp)")
    parser.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="gguf: storage type of the weight matrices: f32, f16, bf16, or llama.cpp's block quantizations "
        "q8_0 / q4_0 (32 values per block with an f16 scale); vectors, norms and the small token-shift / "
        "decay factors stay f32, and a matrix whose rows do not split into 32-value blocks is stored as "
        "f16, as llama.cpp's own converter does (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab",
        default=None,
        metavar="PATH",
        help="gguf: World-format vocab file for the tokenizer block (default: the RWKV World vocab "
        "rwkv_vocab_v20230424 that rwkvkit's 'world' tokenizer uses); the model's vocabulary must cover it",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="gguf: model name stored as general.name (default: the output file's stem)",
    )
    parser.add_argument(
        "--dtype",
        default="keep",
        choices=HF_DTYPES,
        help="hf: dtype of the stored tensors; 'keep' keeps each tensor's dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="TOK",
        help="hf: the tokenizer files to include: 'world' (the RWKV World tokenizer as a transformers "
        "tokenizer; the default for a 65536-token vocabulary), the path of a tokenizer.json (copied, e.g. "
        "GPT-NeoX's 20B_tokenizer.json for RWKV-4 Pile models), or 'none' (default for other vocabularies)",
    )
    parser.add_argument(
        "-o", "--out", required=True, metavar="OUT", help="output: a .gguf file, or the folder for --to hf"
    )
    parser.add_argument(
        "--progress",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="show a progress bar on stderr, one step per tensor (use --no-progress to turn off)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit export``."""
    if args.to == "hf":
        return run_hf(args)
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise RwkvkitError(f"the output must be a .gguf file, got {out}")
    if out.resolve() == Path(args.model).resolve():
        raise RwkvkitError("the output would overwrite the input model")
    from rwkvkit.export.gguf import export_gguf  # imports torch and gguf: not for --help

    t0 = time.perf_counter()
    summary = export_gguf(args.model, out, args.type, args.vocab, args.name, progress=args.progress)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary.types.items()))
    print(
        f"wrote {out}: {summary.architecture} {summary.file_type}, {summary.n_tensors} tensors "
        f"({types}), {summary.n_bytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def run_hf(args: argparse.Namespace) -> int:
    """``rwkvkit export MODEL --to hf -o DIR``."""
    out = Path(args.out)
    if out.resolve() == Path(args.model).resolve():
        raise RwkvkitError("the output would overwrite the input model")
    from rwkvkit.export.hf import export_hf  # imports torch: not for --help

    t0 = time.perf_counter()
    dtype = None if args.dtype == "keep" else args.dtype
    summary = export_hf(args.model, out, dtype=dtype, tokenizer=args.tokenizer)
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"wrote {out}/: {summary.config.describe()} as {summary.layout.architecture} "
        f"({summary.layout.name} layout), {summary.n_tensors} tensors, {summary.n_bytes / 2**20:.1f} MiB, "
        f"files {', '.join(summary.files)} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
