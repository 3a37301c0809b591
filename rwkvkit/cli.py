"""The ``rwkvkit`` command line: argument parsing, subcommand dispatch and error reporting.

Subcommands: ``generate`` (stream text from a checkpoint) and ``info`` (describe a checkpoint) here;
``train``, ``data``, ``eval`` and ``merge`` have their flags in their own modules (LAZY_COMMANDS). Each
subcommand imports what it needs when it runs, so ``rwkvkit --help`` does not import torch. Any
RwkvkitError becomes one line ``error: <message>`` on stderr with exit status 2 (the same status as an
argparse usage error); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from rwkvkit import __version__
from rwkvkit.errors import RwkvkitError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_BY_VOCAB = {65536: "world", 256: "byte"}
# The same values as rwkvkit.infer.generate.DEFAULT_* (repeated so that --help does not import torch).
DEFAULT_MAX_TOKENS = 200
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.85
DEFAULT_TOP_K = 0
DEFAULT_PREFILL_CHUNK = 256

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t, \\r and \\\\ into the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- generate


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to stdout",
        description="Continue a prompt with an RWKV model and stream the text to stdout as it is generated.",
    )
    p.add_argument("--model", "-m", required=True, metavar="PATH", help="checkpoint (.pth or .safetensors)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", "-p", metavar="TEXT", help="the prompt text")
    source.add_argument(
        "--prompt-file", metavar="PATH", help="read the prompt from this UTF-8 text file ('-' for stdin)"
    )
    p.add_argument(
        "--max-tokens",
        type=_non_negative_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="generate at most N tokens (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help="sampling temperature; 0 = greedy, always the most likely token (default: %(default)s)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=DEFAULT_TOP_P,
        metavar="P",
        help="nucleus sampling: keep the most likely tokens whose probability adds up to P, in (0, 1]; "
        "1 disables it (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=_non_negative_int,
        default=DEFAULT_TOP_K,
        metavar="K",
        help="keep only the K most likely tokens (after top-p); 0 disables it (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=None, metavar="N", help="random seed: the same seed gives the same text"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME|PATH",
        help="'world', 'byte', the path of a Hugging Face tokenizer.json (e.g. GPT-NeoX's 20B_tokenizer.json "
        "for RWKV-4 Pile models; needs pip install 'rwkvkit[neox]'), or the path of a World-format vocab "
        "file (default: 'world' for a model with a 65536-token vocabulary, 'byte' for 256; other "
        "vocabulary sizes must name one)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when this string is generated; it is not printed. Repeatable. \\n, \\t, \\r and \\\\ "
        "are read as newline, tab, carriage return and backslash (e.g. --stop '\\n\\nUser:')",
    )
    p.add_argument(
        "--no-eot-stop",
        action="store_true",
        help="do not stop at the end-of-text token (id 0)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1, mps (default: cpu)"
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="weight precision: fp32, bf16 or fp16 (default: %(default)s)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=_positive_int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help="run the prompt through the model N tokens at a time (default: %(default)s)",
    )
    p.add_argument(
        "--bf16-prefill",
        action="store_true",
        help="run the prompt's matmuls in bf16 where the CPU does bf16 natively (AVX512-BF16 / AMX): faster "
        "prompts, results within bf16 rounding of fp32",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="after the text, print token counts, speed and why generation stopped to stderr",
    )
    p.set_defaults(run=_run_generate)


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


def _torch_device(name: str):
    import torch

    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvkitError(f"device '{name}' is not usable here ({detail})") from None
    return device


def _default_tokenizer(vocab_size: int) -> str:
    name = TOKENIZER_BY_VOCAB.get(vocab_size)
    if name is None:
        raise RwkvkitError(
            f"the model's vocabulary has {vocab_size} tokens, which matches no built-in tokenizer "
            "(world: 65536, byte: 256); choose one with --tokenizer"
        )
    return name


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer) from a command's --model, --device, --dtype and --tokenizer flags (the device is
    checked first; the tokenizer defaults to the built-in one matching the vocabulary)."""
    import torch

    from rwkvkit.models import load_model
    from rwkvkit.tokenizer import load_tokenizer

    device = _torch_device(args.device)
    model = load_model(args.model, device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    return model, load_tokenizer(args.tokenizer or _default_tokenizer(model.config.vocab_size))


def _run_generate(args: argparse.Namespace) -> int:

    from rwkvkit.infer import generate
    from rwkvkit.infer.sampling import check_sampling_args

    # Cheap checks first, before reading a large checkpoint.
    check_sampling_args(args.temperature, args.top_p, args.top_k)
    prompt = _read_prompt(args)
    if prompt == "":
        raise RwkvkitError("empty prompt: give some text with --prompt or --prompt-file")
    stop_strings = [_unescape(s) for s in args.stop]
    if any(s == "" for s in stop_strings):
        raise RwkvkitError("--stop needs a non-empty string")
    model, tokenizer = load_model_and_tokenizer(args)

    stream = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_tokens=() if args.no_eot_stop else None,
        stop_strings=stop_strings,
        prefill_chunk=args.prefill_chunk,
        bf16_prefill=args.bf16_prefill,
    )
    out = sys.stdout
    encoding = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "")
    if encoding != "utf8" and hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")  # a non-UTF-8 console shows '?' rather than failing mid-stream
    for piece in stream:
        out.write(piece)
        out.flush()
    if out.isatty():
        out.write("\n")
        out.flush()
    result = stream.result
    if args.stats and result is not None:
        n_new = len(result.tokens)
        print(
            f"[prompt {result.prompt_tokens} tokens in {result.prefill_seconds:.2f}s "
            f"({result.prompt_tokens / max(result.prefill_seconds, 1e-9):.1f} tok/s); "
            f"generated {n_new} tokens in {result.decode_seconds:.2f}s "
            f"({n_new / max(result.decode_seconds, 1e-9):.1f} tok/s); finish: {result.finish_reason}"
            + (f" at {result.stop!r}]" if result.stop is not None else "]"),
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------------------------------- info


def _add_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a checkpoint: version, shapes, parameter count, dtypes",
        description="Describe an RWKV checkpoint from its tensor shapes, without building the model.",
    )
    p.add_argument("model", metavar="PATH", help="checkpoint (.pth or .safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=_run_info)


def checkpoint_info(path: str | os.PathLike) -> dict:
    """A description of the checkpoint at ``path`` (the dict ``rwkvkit info --json`` prints).

    Reads the state dict memory-mapped and checks its keys and shapes against the model (built on the
    "meta" device, so no weights are copied or converted). Holds every ModelConfig field.
    """
    from collections import Counter

    from rwkvkit.checkpoint import load_state_dict
    from rwkvkit.models import check_state_dict
    from rwkvkit.quant import read_quantized_metadata

    quantized = read_quantized_metadata(path)
    state_dict = load_state_dict(path)
    if quantized is not None:
        from rwkvkit.quant import load_quantized

        config = load_quantized(path, device="cpu").config  # checks the file against its metadata
    else:
        config = check_state_dict(state_dict, source=str(path))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state_dict.values())
    return {
        "file": str(path),
        "file_size": os.path.getsize(path),
        **config.to_dict(),
        "quantization": None
        if quantized is None
        else f"{quantized['scheme']}"
        + (f" (group size {quantized['group_size']})" if quantized["scheme"] == "int4" else ""),
        "parameters": sum(t.numel() for t in state_dict.values()),
        "tensors": len(state_dict),
        "dtypes": dict(dtypes.most_common()),
    }


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _run_info(args: argparse.Namespace) -> int:
    import json

    info = checkpoint_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    dtypes = ", ".join(f"{name} ({count} tensors)" for name, count in info["dtypes"].items())
    rows = [
        ("file", f"{info['file']} ({_human_bytes(info['file_size'])}, {info['file_size']:,} bytes)"),
        ("version", f"RWKV-{info['version']}"),
        ("layers", info["n_layer"]),
        ("n_embd", info["n_embd"]),
        ("heads", f"{info['n_head']} x {info['head_size']}" if info["n_head"] else "none (per channel)"),
        ("att width", info["dim_att"]),
        ("ffn width", info["dim_ffn"]),
        ("vocab", info["vocab_size"]),
    ]
    if info["version"] == "7":
        low_rank = (
            f"decay {info['d_decay']}, iclr {info['d_iclr']}, value {info['d_value']}, gate {info['d_gate']}"
        )
        rows.append(("low-rank", low_rank))
    elif info["version"] == "6":
        rows.append(("low-rank", f"mix {info['d_mix']}, decay {info['d_decay']}"))
    if info["has_time_state"]:
        rows.append(("tuned state", "yes (att.time_state: the initial state of every sequence)"))
    if info["quantization"]:
        rows.append(("quantized", info["quantization"]))
    rows += [
        ("parameters", f"{info['parameters']:,}"),
        ("dtype", dtypes),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------- lazy

# Subcommands whose flags live in (and are parsed by) another module, imported only when selected:
# name -> (one-line summary, module, function adding the flags, function running the command).
LAZY_COMMANDS = {
    "train": (
        "train or fine-tune an RWKV model (any version; LoRA, state tuning; one process or torchrun)",
        "rwkvkit.train.trainer",
        "add_arguments",
        "run",
    ),
    "data": (
        "tokenize .txt / .jsonl / .parquet files into a binidx training dataset (.bin + .idx)",
        "rwkvkit.train.prepare",
        "add_arguments",
        "run",
    ),
    "eval": (
        "loss, perplexity and bits per byte of a model on a text file",
        "rwkvkit.evaluate",
        "add_arguments",
        "run",
    ),
    "quantize": (
        "quantize a checkpoint's projection matrices to int8 or int4 (a .safetensors for fast CPU decoding)",
        "rwkvkit.quant",
        "add_arguments",
        "run",
    ),
    "merge": (
        "merge a LoRA adapter (.safetensors from rwkvkit train --tune lora) into an official .pth",
        "rwkvkit.train.finetune",
        "add_merge_arguments",
        "run_merge",
    ),
    "chat": (
        "chat with an RWKV World model in the terminal (streamed replies; /save and /load a conversation)",
        "rwkvkit.infer.chat",
        "add_arguments",
        "run",
    ),
    "serve": (
        "serve a model over an OpenAI-compatible HTTP API (completions, chat, embeddings; streaming)",
        "rwkvkit.infer.server",
        "add_arguments",
        "run",
    ),
}


def _add_lazy(subparsers, name: str, load: bool) -> None:
    """Register a LAZY_COMMANDS subcommand; its module is imported only when ``load`` (it was selected)."""
    summary, module_name, add_flags, run = LAZY_COMMANDS[name]
    if not load:
        subparsers.add_parser(name, help=summary, add_help=False)
        return
    import importlib

    module = importlib.import_module(module_name)
    p = subparsers.add_parser(name, help=summary, description=summary)
    getattr(module, add_flags)(p)
    p.set_defaults(run=getattr(module, run))


# ---------------------------------------------------------------------------------------------- main


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv``: the first non-option argument (top-level options take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; a LAZY_COMMANDS subcommand is filled in only when ``argv`` selects it."""
    parser = argparse.ArgumentParser(
        prog="rwkvkit",
        description="Train, fine-tune and run RWKV language models. "
        "Run 'rwkvkit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"rwkvkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate(subparsers)
    _add_info(subparsers)
    for name in LAZY_COMMANDS:
        _add_lazy(subparsers, name, load=_command_name(argv) == name)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rwkvkit`` command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        return int(args.run(args) or 0)
    except RwkvkitError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `rwkvkit generate ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
