"""``rwkvkit eval``: loss, perplexity and bits per byte of a model on a text file, or the masked loss on a
chat ``.jsonl`` (the assistant's tokens only, as ``rwkvkit train`` weights them; see rwkvkit.evaluate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rwkvkit.cli.common import add_model_args, load_model_and_tokenizer
from rwkvkit.errors import RwkvkitError
from rwkvkit.evaluate import DEFAULT_CHUNK_LEN, evaluate_chat, evaluate_text
from rwkvkit.train.chat_data import first_record_is_chat


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rwkvkit eval``."""
    add_model_args(parser, positional=True)
    parser.add_argument(
        "--text",
        required=True,
        metavar="FILE",
        help="UTF-8 text file to evaluate on, or a chat .jsonl ('messages' or 'prompt' + 'completion' "
        "records): then each record is scored from the initial state on the assistant's tokens only",
    )
    parser.add_argument(
        "--chunk-len",
        type=int,
        default=DEFAULT_CHUNK_LEN,
        metavar="N",
        help="tokens per model call; the state is carried between calls (default: %(default)s)",
    )
    parser.add_argument(
        "--no-eot-prefix",
        action="store_true",
        help="do not put the end-of-text id before the text (then its first token is not scored)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise RwkvkitError(f"no such text file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rwkvkit eval``."""
    path = Path(args.text)
    if path.suffix.lower() == ".jsonl" and path.is_file() and first_record_is_chat(path):
        return _run_chat(args, path)
    text = _read_text(path)
    model, tokenizer = load_model_and_tokenizer(args)
    result = evaluate_text(model, tokenizer, text, args.chunk_len, eot_prefix=not args.no_eot_prefix)
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(path), **result.to_dict()}))
        return 0
    print(f"model          {args.model} ({model.config.describe()})")
    print(f"text           {path} ({result.bytes:,} bytes, {result.tokens:,} tokens scored)")
    print(f"loss           {result.loss:.4f} nats/token")
    print(f"perplexity     {result.perplexity:.3f}")
    print(f"bits per byte  {result.bits_per_byte:.4f}")
    return 0


def _run_chat(args: argparse.Namespace, path: Path) -> int:
    """``rwkvkit eval`` of a chat .jsonl: the masked loss."""
    model, tokenizer = load_model_and_tokenizer(args)
    result = evaluate_chat(model, tokenizer, path, args.chunk_len)
    if args.json:
        print(json.dumps({"model": str(args.model), "text": str(path), "masked": True, **result.to_dict()}))
        return 0
    print(f"model          {args.model} ({model.config.describe()})")
    print(f"chat data      {path} ({result.records:,} records, {result.tokens:,} assistant tokens scored)")
    print(f"masked loss    {result.loss:.4f} nats/token")
    print(f"perplexity     {result.perplexity:.3f}")
    print(f"bits per byte  {result.bits_per_byte:.4f}")
    return 0
