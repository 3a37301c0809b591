"""The ``rwkvkit`` command line: subcommand dispatch and the one error handler.

Each subcommand is a module of this package with ``add_arguments(parser)`` and ``run(args)``; a module is
imported only when its command is selected, so ``rwkvkit --help`` does not import torch. Any RwkvkitError
becomes one line ``error: <message>`` on stderr with exit status 2 (the same status as an argparse usage
error); Ctrl-C exits with 130; a closed stdout (``rwkvkit generate ... | head``) exits quietly with 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from rwkvkit import __version__
from rwkvkit.cli.common import one_line
from rwkvkit.errors import RwkvkitError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# name -> (one-line summary, module with add_arguments(parser) and run(args)), in the order --help lists them.
COMMANDS = {
    "generate": ("generate text from a checkpoint, streamed to stdout", "rwkvkit.cli.generate"),
    "info": ("describe a checkpoint: version, shapes, parameter count, dtypes", "rwkvkit.cli.info"),
    "train": (
        "train or fine-tune an RWKV model (any version; LoRA, state tuning; one process or torchrun)",
        "rwkvkit.cli.train",
    ),
    "data": (
        "tokenize .txt / .jsonl / .parquet files into a binidx training dataset (.bin + .idx)",
        "rwkvkit.cli.data",
    ),
    "eval": ("loss, perplexity and bits per byte of a model on a text file", "rwkvkit.cli.eval"),
    "quantize": (
        "quantize a checkpoint's projection matrices to int8 or int4 (a .safetensors for fast CPU decoding)",
        "rwkvkit.cli.quantize",
    ),
    "export": (
        "export an RWKV-6 / RWKV-7 checkpoint as GGUF for llama.cpp (f32, f16, bf16, q8_0, q4_0)",
        "rwkvkit.cli.export",
    ),
    "merge": (
        "merge a LoRA adapter (.safetensors from rwkvkit train --tune lora) into an official .pth",
        "rwkvkit.cli.merge",
    ),
    "chat": (
        "chat with an RWKV World model in the terminal (streamed replies; /save and /load a conversation)",
        "rwkvkit.cli.chat",
    ),
    "serve": (
        "serve a model over an OpenAI-compatible HTTP API (completions, chat, embeddings; streaming)",
        "rwkvkit.cli.serve",
    ),
}


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the first non-option argument (top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _add_command(subparsers, name: str, load: bool) -> None:
    """Register a subcommand; its module is imported (and its flags added) only when ``load``."""
    summary, module_name = COMMANDS[name]
    if not load:
        subparsers.add_parser(name, help=summary, add_help=False)
        return
    module = importlib.import_module(module_name)
    p = subparsers.add_parser(name, help=summary, description=summary)
    module.add_arguments(p)  # may set its own description
    p.set_defaults(run=module.run)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; only the subcommand ``argv`` selects is filled in."""
    parser = argparse.ArgumentParser(
        prog="rwkvkit",
        description="Train, fine-tune and run RWKV language models. "
        "Run 'rwkvkit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    selected = _command_name(argv)
    for name in COMMANDS:
        _add_command(subparsers, name, load=selected == name)
    return parser


def run_parsed(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> int:
    """Parse ``argv`` with the parser ``make_parser`` builds and run ``args.run(args)`` under the one error
    handler of the rwkvkit commands. Returns the exit status."""
    try:
        parser = make_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        return int(args.run(args) or 0)
    except RwkvkitError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `rwkvkit generate ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rwkvkit`` command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_parsed(lambda: build_parser(argv), argv)
