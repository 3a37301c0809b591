"""``rwkvkit train`` (and ``python -m rwkvkit.train`` / ``torchrun -m rwkvkit.train``): the flags built from
:class:`rwkvkit.train.config.TrainConfig`'s fields, and the run with its summary."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from typing import Any

from rwkvkit.train.config import FLAG_HELP, LIST_FIELDS, TrainConfig, config_from_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Fill ``parser`` with ``--config`` and one flag per TrainConfig field.

    Flags default to "not given" (absent from the parsed namespace), so :func:`config_from_args` can
    tell a flag on the command line from a value in the config file.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML (.yaml/.yml) or TOML (.toml) file whose keys are the options below; flags on the "
        "command line override it",
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ", ".join(default) if isinstance(default, list) else default
        help_text = f"{FLAG_HELP[f.name]} (default: {shown if shown != '' else 'none'})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in LIST_FIELDS:
            parser.add_argument(flag, action="append", metavar="GLOB", **kwargs)
        else:
            parser.add_argument(flag, type=type(default), metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return config_from_settings(given, getattr(args, "config", None))


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit train``: train, then (on the first process) print where the model went."""
    from rwkvkit.train.trainer import train  # imports torch: only when the command runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args)
    result = train(config)
    if result.rank == 0:  # under torchrun, the first process reports
        unit = " nats/token" if config.objective == "lm" else f" (the {config.objective} loss)"
        print(f"model: {result.model_path}")
        print(f"final training loss: {result.final_loss:.4f}{unit}")
        if result.val_loss is not None:
            print(f"validation loss: {result.val_loss:.4f}{unit}")
    return 0
