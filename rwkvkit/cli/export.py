"""``rwkvkit export``: write a checkpoint in another runtime's format (:mod:`rwkvkit.export`); today GGUF
for llama.cpp (RWKV-6 and RWKV-7)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rwkvkit.errors import RwkvkitError

FORMATS = ("gguf",)
# The same values as rwkvkit.export.gguf.TYPES (repeated so that --help does not import torch).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

DESCRIPTION = (
    "Export an RWKV-6 or RWKV-7 checkpoint as a GGUF file for llama.cpp (architectures 'rwkv6' and "
    "'rwkv7'), with the World tokenizer. RWKV-4 and RWKV-5.2 have no llama.cpp architecture and are "
    "refused. Needs the gguf package: pip install 'rwkvkit[gguf]'."
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
        help="storage type of the weight matrices: f32, f16, bf16, or llama.cpp's block quantizations "
        "q8_0 / q4_0 (32 values per block with an f16 scale); vectors, norms and the small token-shift / "
        "decay factors stay f32, and a matrix whose rows do not split into 32-value blocks is stored as "
        "f16, as llama.cpp's own converter does (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab",
        default=None,
        metavar="PATH",
        help="World-format vocab file for the tokenizer block (default: the RWKV World vocab "
        "rwkv_vocab_v20230424 that rwkvkit's 'world' tokenizer uses); the model's vocabulary must cover it",
    )
    parser.add_argument(
        "--name", default=None, help="model name stored as general.name (default: the output file's stem)"
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output file (.gguf)")
    parser.add_argument(
        "--progress",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="show a progress bar on stderr, one step per tensor (use --no-progress to turn off)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit export``."""
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
