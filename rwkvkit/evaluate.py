"""Language-model evaluation of a text: loss, perplexity and bits per byte (``rwkvkit eval``).

The whole text is one sequence: it runs through the model in chunks of ``chunk_len`` tokens with the
state carried between chunks (RNN-style, so memory stays bounded and every token sees all of the text
before it), and every token is scored against the logits after the tokens before it. By default the
end-of-text id 0 goes first, as at the start of a training document, so that the first token of the text
is scored too and bits per byte covers every byte of the text.

    loss (nats per token) = sum of -log p(token) / tokens scored
    perplexity            = exp(loss)
    bits per byte         = sum of -log2 p(token) / UTF-8 bytes of the tokens scored

Bits per byte compares models with different tokenizers; nats per token does not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rwkvkit.errors import RwkvkitError

DEFAULT_CHUNK_LEN = 512


@dataclass
class TextEvaluation:
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored tokens
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def evaluate_tokens(model, ids: list[int], chunk_len: int = DEFAULT_CHUNK_LEN) -> float:
    """The summed next-token cross-entropy (nats) of ids[1:] given what precedes each one."""
    if len(ids) < 2:
        raise RwkvkitError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    if chunk_len < 1:
        raise RwkvkitError(f"chunk length must be positive, got {chunk_len}")
    ids_t = torch.tensor(ids, dtype=torch.long)
    total, state = 0.0, None
    for start in range(0, len(ids) - 1, chunk_len):
        x = ids_t[start : min(start + chunk_len, len(ids) - 1)].unsqueeze(0).to(model.device)  # (1, T)
        y = ids_t[start + 1 : start + 1 + x.shape[1]].to(model.device)  # (T,)
        logits, state = model(x, state)  # (1, T, V)
        total += F.cross_entropy(logits[0].float(), y, reduction="sum").item()
    return total


def evaluate_text(
    model, tokenizer, text: str, chunk_len: int = DEFAULT_CHUNK_LEN, eot_prefix: bool = True
) -> TextEvaluation:
    """Loss, perplexity and bits per byte of ``model`` on ``text`` (see the module docstring)."""
    import time

    t0 = time.perf_counter()
    ids = tokenizer.encode(text)
    if eot_prefix:
        ids = [tokenizer.eot_id, *ids]
    if len(ids) < 2:
        raise RwkvkitError("the text is too short to evaluate (it needs at least one token to score)")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise RwkvkitError(
            f"the tokenizer gives id {bad[0]}, outside the model's vocabulary of {model.config.vocab_size}; "
            "choose the tokenizer the model was trained with"
        )
    nats = evaluate_tokens(model, ids, chunk_len)
    n_scored = len(ids) - 1
    n_bytes = len(tokenizer.decode_bytes(ids[1:]))
    loss = nats / n_scored
    return TextEvaluation(
        tokens=n_scored,
        bytes=n_bytes,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nats / math.log(2) / max(n_bytes, 1),
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """The flags of ``rwkvkit eval``."""
    parser.add_argument("model", metavar="MODEL", help="checkpoint (.pth or .safetensors)")
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to evaluate on")
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME|PATH",
        help="'world', 'byte', a World vocab file or a tokenizer.json (default: 'world' for a "
        "65536-token vocabulary, 'byte' for 256)",
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
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps (default: cpu)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weight precision (default: fp32)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Entry point of ``rwkvkit eval``."""
    import json
    from pathlib import Path

    from rwkvkit.cli import load_model_and_tokenizer

    path = Path(args.text)
    if not path.is_file():
        raise RwkvkitError(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvkitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
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
