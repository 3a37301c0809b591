"""``rwkvkit merge``: fold a LoRA adapter into its base checkpoint (:mod:`rwkvkit.train.finetune`)."""

from __future__ import annotations

import argparse

from rwkvkit.train.finetune import merge_adapter_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit merge --base M.pth --adapter A.safetensors -o OUT.pth``."""
    parser.add_argument(
        "--base", required=True, metavar="PATH", help="base checkpoint (.pth or .safetensors)"
    )
    parser.add_argument(
        "--adapter", required=True, metavar="PATH", help="LoRA adapter (.safetensors) made for that base"
    )
    parser.add_argument(
        "--out", "-o", required=True, metavar="PATH", help="merged checkpoint to write (.pth or .safetensors)"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit merge``."""
    out = merge_adapter_file(args.base, args.adapter, args.out)
    print(f"merged model: {out}")
    return 0
