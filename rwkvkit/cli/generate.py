"""``rwkvkit generate``: continue a prompt and stream the text to stdout."""

from __future__ import annotations

import argparse
import sys

from rwkvkit.cli.common import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    add_bf16_prefill_arg,
    add_model_args,
    add_sampling_args,
    load_model_and_tokenizer,
    non_negative_int,
    positive_int,
    sampling_params,
    streaming_stdout,
    unescape,
)
from rwkvkit.errors import RwkvkitError

DESCRIPTION = "Continue a prompt with an RWKV model and stream the text to stdout as it is generated."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit generate``."""
    parser.description = DESCRIPTION
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", metavar="TEXT", help="the prompt text")
    source.add_argument(
        "--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 text file ('-' for stdin)"
    )
    parser.add_argument(
        "--max-tokens",
        type=non_negative_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="generate at most N tokens (default: %(default)s)",
    )
    add_sampling_args(parser)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when this string is generated; it is not printed. Repeatable. \\n, \\t, \\r and \\\\ "
        "are read as newline, tab, carriage return and backslash (e.g. --stop '\\n\\nUser:')",
    )
    parser.add_argument(
        "--no-eot-stop",
        action="store_true",
        help="do not stop at the end-of-text token (id 0)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help="run the prompt through the model N tokens at a time (default: %(default)s)",
    )
    add_bf16_prefill_arg(parser)
    parser.add_argument(
        "--stats",
        action="store_true",
        help="after the text, print token counts, speed and why generation stopped to stderr",
    )


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise RwkvkitError(f"prompt file {args.prompt_file} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise RwkvkitError(f"cannot read prompt file {args.prompt_file}: {e.strerror or e}") from None


def _print_stats(result) -> None:
    n_new = len(result.tokens)
    print(
        f"[prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f}s "
        f"({result.prompt_tokens / max(result.prefill_seconds, 1e-9):.1f} tok/s); "
        f"generated {n_new} tokens in {result.decode_seconds:.2f}s "
        f"({n_new / max(result.decode_seconds, 1e-9):.1f} tok/s); finish: {result.finish_reason}"
        + (f" at {result.stop!r}]" if result.stop is not None else "]"),
        file=sys.stderr,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit generate``."""
    # imported here, not at the top: they import torch, which `rwkvkit generate --help` does not need
    from rwkvkit.infer import generate

    # Cheap checks first, before reading a large checkpoint.
    sampling = sampling_params(args)
    prompt = _read_prompt(args)
    if prompt == "":
        raise RwkvkitError("empty prompt: give some text with --prompt or --prompt-file")
    stop_strings = [unescape(s) for s in args.stop]
    if any(s == "" for s in stop_strings):
        raise RwkvkitError("--stop needs a non-empty string")
    model, tokenizer = load_model_and_tokenizer(args)

    stream = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampling=sampling,
        stop_tokens=() if args.no_eot_stop else None,
        stop_strings=stop_strings,
        prefill_chunk=args.prefill_chunk,
        bf16_prefill=args.bf16_prefill,
    )
    out = streaming_stdout()
    for piece in stream:
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")
        out.flush()
    if args.stats and stream.result is not None:
        _print_stats(stream.result)
    return 0
