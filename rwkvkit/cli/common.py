"""What the ``rwkvkit`` commands share: the model and sampling flags (defined once), argument types,
text helpers, loading a command's model and tokenizer, and the stdout set-up of streaming commands.

Nothing here imports torch at module level, so ``rwkvkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, TextIO

from rwkvkit.errors import RwkvkitError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The same values as rwkvkit.infer.generate.DEFAULT_* (repeated so that --help does not import torch).
DEFAULT_MAX_TOKENS = 200
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.85
DEFAULT_TOP_K = 0
DEFAULT_PREFILL_CHUNK = 256

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}

# ---------------------------------------------------------------------------------------------- types


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- text


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t, \\r and \\\\ into the characters they name."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def one_line(error: BaseException) -> str:
    """An error's message on one line (whitespace runs collapsed), or its type's name when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def streaming_stdout() -> TextIO:
    """``sys.stdout``, set so that a non-UTF-8 console shows '?' rather than failing mid-stream."""
    out = sys.stdout
    encoding = (getattr(out, "encoding", None) or "utf-8").lower().replace("-", "")
    if encoding != "utf8" and hasattr(out, "reconfigure"):
        out.reconfigure(errors="replace")
    return out


# ---------------------------------------------------------------------------------------------- flags


def add_model_args(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """The flags that choose a model and where it runs: the checkpoint (``--model/-m``, or a positional
    MODEL when ``positional``), ``--tokenizer``, ``--device`` and ``--dtype``."""
    if positional:
        parser.add_argument("model", metavar="MODEL", help="checkpoint (.pth or .safetensors)")
    else:
        parser.add_argument(
            "--model", "-m", required=True, metavar="PATH", help="checkpoint (.pth or .safetensors)"
        )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME|PATH",
        help="'world', 'byte', the path of a Hugging Face tokenizer.json (e.g. GPT-NeoX's 20B_tokenizer.json "
        "for RWKV-4 Pile models; needs pip install 'rwkvkit[neox]'), or the path of a World-format vocab "
        "file (default: 'world' for a model with a 65536-token vocabulary, 'byte' for 256; other "
        "vocabulary sizes must name one)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1, mps (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="weight precision: fp32, bf16 or fp16 (default: %(default)s)",
    )


def add_bf16_prefill_arg(parser: argparse.ArgumentParser) -> None:
    """``--bf16-prefill``: prompts (and chat turns) read with bf16 matmuls where the CPU has them."""
    parser.add_argument(
        "--bf16-prefill",
        action="store_true",
        help="run the prompt's matmuls in bf16 where the CPU does bf16 natively (AVX512-BF16 / AMX): faster "
        "prompts, results within bf16 rounding of fp32",
    )


def add_sampling_args(
    parser: argparse.ArgumentParser,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    seed_help: str = "random seed: the same seed gives the same text",
) -> None:
    """``--temperature``, ``--top-p``, ``--top-k`` and ``--seed`` with the given defaults."""
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        metavar="T",
        help="sampling temperature; 0 = greedy, always the most likely token (default: %(default)s)",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=top_p,
        metavar="P",
        help="nucleus sampling: keep the most likely tokens whose probability adds up to P, in (0, 1]; "
        "1 disables it (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=non_negative_int,
        default=top_k,
        metavar="K",
        help="keep only the K most likely tokens (after top-p); 0 disables it (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=None, metavar="N", help=seed_help)


def sampling_params(args: argparse.Namespace) -> Any:
    """The ``SamplingParams`` of the flags of :func:`add_sampling_args`, checked now (before a large
    checkpoint is read)."""
    from rwkvkit.infer.sampling import SamplingParams, check_sampling_args  # imports torch: not for --help

    check_sampling_args(args.temperature, args.top_p, args.top_k)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


# ---------------------------------------------------------------------------------------------- loading


def torch_device(name: str) -> Any:
    """``torch.device(name)``, checked by allocating on it (RwkvkitError if it is not usable here)."""
    import torch  # here, not at the top: --help must not import torch

    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RwkvkitError(f"device '{name}' is not usable here ({detail})") from None
    return device


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from a command's --model, --device, --dtype and --tokenizer flags (the device is
    checked first; the tokenizer defaults to the one a Hugging Face folder ships, else to the built-in one
    matching the vocabulary)."""
    import torch  # here, not at the top: --help must not import torch

    from rwkvkit.checkpoint import folder_tokenizer  # imports torch: only when a command runs
    from rwkvkit.models import load_model
    from rwkvkit.tokenizer import default_tokenizer, load_tokenizer

    device = torch_device(args.device)
    model = load_model(args.model, device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    shipped = folder_tokenizer(args.model)
    return model, load_tokenizer(args.tokenizer or shipped or default_tokenizer(model.config.vocab_size))
