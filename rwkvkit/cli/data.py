"""``rwkvkit data``: tokenize text files into a binidx training dataset.

This module owns the command's flags and what it prints; the work is
:func:`rwkvkit.train.data.prepare_dataset`. It does not import torch.
"""

from __future__ import annotations

import argparse

from rwkvkit.cli.common import positive_int
from rwkvkit.train.data import DEFAULT_WORKERS, prepare_dataset

DESCRIPTION = (
    "Tokenize documents into the Megatron binidx format that RWKV-LM trains from: OUT_PREFIX.bin holds "
    "the uint16 token ids of every document, each followed by the end-of-text id 0, and OUT_PREFIX.idx "
    "the index. Inputs: .txt (the whole file is one document), .jsonl (one JSON object per line; the "
    "--text-key field is the document) and .parquet (the --text-key column, one document per row; needs "
    "pyarrow). Chat / instruction .jsonl (records with 'messages' or 'prompt' + 'completion') is rendered "
    "with the World chat format, one sequence per record, and its loss mask (1 on the assistant's tokens) "
    "goes beside the pair in OUT_PREFIX.mask.npy, which rwkvkit train reads with it. Documents keep their "
    "input order whatever the number of workers. The files appear only once everything succeeded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit data``."""
    parser.description = DESCRIPTION
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="input files (.txt, .jsonl or .parquet), read in the order given",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT_PREFIX",
        help="output prefix: writes OUT_PREFIX.bin and OUT_PREFIX.idx (a trailing .bin or .idx is ignored)",
    )
    parser.add_argument(
        "--tokenizer",
        default="world",
        metavar="world|byte|PATH",
        help="'world' (RWKV World, 65536 ids), 'byte' (256 ids), the path of a Hugging Face tokenizer.json "
        "or of a World-format vocab file; at most 65536 ids (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="tokenize in N processes; 1 = in this process; the output is the same for any N "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--text-key",
        default="text",
        metavar="KEY",
        help="JSON field (.jsonl) or column (.parquet) that holds the text (default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="show a progress bar on stderr (use --no-progress to turn off)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``rwkvkit data``: write the binidx pair and print a one-line summary."""
    summary = prepare_dataset(
        args.inputs,
        args.output,
        tokenizer=args.tokenizer,
        workers=args.workers,
        text_key=args.text_key,
        progress=args.progress,
    )
    what = "chat records" if summary.mask_path else "documents"
    mask = f" and the loss mask {summary.mask_path}" if summary.mask_path else ""
    print(
        f"{summary.documents:,} {what}, {summary.tokens:,} tokens in {summary.seconds:.1f}s "
        f"({summary.tokens_per_second:,.0f} tokens/s): wrote {summary.bin_path}, {summary.idx_path}{mask}"
    )
    return 0
