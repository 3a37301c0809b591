"""``python -m rwkvkit.demo`` (``make demo``): the flags of :func:`rwkvkit.demo.run_demo`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import rwkvkit.demo
from rwkvkit.cli import run_parsed


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser (its ``run`` default runs the demo)."""
    parser = argparse.ArgumentParser(prog="python -m rwkvkit.demo", description=rwkvkit.demo.__doc__)
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument(
        "--time-budget", type=float, default=270.0, help="training time in seconds (default: 270)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="schedule horizon in steps (default: 2000)")
    parser.add_argument("--rnn-check-tokens", type=int, default=1024, help="val tokens for the RNN check")
    parser.add_argument("--sample-tokens", type=int, default=400, help="bytes to generate (default: 400)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo with the parsed flags."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return rwkvkit.demo.run_demo(
        out=args.out,
        time_budget=args.time_budget,
        steps=args.steps,
        rnn_check_tokens=args.rnn_check_tokens,
        sample_tokens=args.sample_tokens,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rwkvkit.demo``. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_parsed(build_parser, argv)
