"""Language-model evaluation of a text: loss, perplexity and bits per byte (behind ``rwkvkit eval``).

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
