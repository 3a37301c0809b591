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

:func:`score_tokens` is the scoring under it, for a batch of sequences (the summed log-probability of each
one's last tokens, and whether they are all greedy), and :func:`score_continuations` the same for the
continuations of one context, read once: the lm-evaluation-harness adapter (:mod:`rwkvkit.eval_harness`)
scores its requests with them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.generate import prefill
from rwkvkit.state import RWKVState

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
def score_tokens(
    model,
    sequences: list[list[int]],
    n_scored: list[int],
    chunk_len: int = DEFAULT_CHUNK_LEN,
    state: RWKVState | None = None,
) -> list[tuple[float, bool]]:
    """For each sequence, the summed log-probability (nats) of its last ``n_scored`` tokens, each given all
    the tokens before it, and whether every one of them is the model's most likely next token (greedy).

    The sequences run as one batch, right-padded with id 0 (the padding comes after every scored token,
    so it changes no score), in chunks of ``chunk_len`` positions with the state carried between chunks:
    memory stays bounded for any length and every token sees all of its sequence before it. ``state``
    (one row per sequence): what the sequences continue from (None: they start a text).
    """
    if chunk_len < 1:
        raise RwkvkitError(f"chunk length must be positive, got {chunk_len}")
    if len(sequences) != len(n_scored) or not sequences:
        raise RwkvkitError("score_tokens needs one n_scored per sequence, and at least one sequence")
    lengths = [len(s) for s in sequences]
    for length, n in zip(lengths, n_scored, strict=True):
        if not 1 <= n < length:
            raise RwkvkitError(f"cannot score {n} tokens of a sequence of {length} (1 to length - 1)")
    n_pos = max(lengths) - 1  # input positions
    ids = torch.zeros(len(sequences), n_pos + 1, dtype=torch.long)  # (B, T + 1)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    logp = torch.zeros(len(sequences), n_pos, dtype=torch.float64)  # (B, T): log p(ids[:, t + 1])
    greedy = torch.zeros(len(sequences), n_pos, dtype=torch.bool)  # (B, T)
    for start in range(0, n_pos, chunk_len):
        end = min(start + chunk_len, n_pos)
        x = ids[:, start:end].to(model.device)  # (B, t)
        y = ids[:, start + 1 : end + 1].to(model.device)  # (B, t)
        logits, state = model(x, state)  # (B, t, V)
        logits = logits.float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (B, t)
        logp[:, start:end] = picked.double().cpu()
        greedy[:, start:end] = (logits.argmax(dim=-1) == y).cpu()
    results = []
    for row, (length, n) in enumerate(zip(lengths, n_scored, strict=True)):
        span = slice(length - 1 - n, length - 1)
        results.append((float(logp[row, span].sum()), bool(greedy[row, span].all())))
    return results


@torch.inference_mode()
def score_continuations(
    model, context: list[int], continuations: list[list[int]], chunk_len: int = DEFAULT_CHUNK_LEN
) -> list[tuple[float, bool]]:
    """:func:`score_tokens` of ``context + continuation`` for each (non-empty) continuation, scoring the
    continuation's tokens, with the shared context read once: its state is copied for each continuation
    (an RNN's answer to a multiple-choice question costs the context once, not once per choice)."""
    if not context or not all(continuations):
        raise RwkvkitError("score_continuations needs a context and non-empty continuations")
    logits, state = prefill(model, context, chunk_size=chunk_len)  # logits (V,) after the context
    logp = torch.log_softmax(logits.double(), dim=-1)  # (V,)
    best = int(logits.argmax())
    rest = [i for i, c in enumerate(continuations) if len(c) > 1]
    later = {}
    if rest:
        rows = state.select([0] * len(rest))  # one copy of the context's state per continuation
        scored = [len(continuations[i]) - 1 for i in rest]
        answers = score_tokens(model, [continuations[i] for i in rest], scored, chunk_len, rows)
        later = dict(zip(rest, answers, strict=True))
    results = []
    for i, continuation in enumerate(continuations):
        value, greedy = later.get(i, (0.0, True))
        results.append((float(logp[continuation[0]]) + value, greedy and continuation[0] == best))
    return results


def evaluate_tokens(model, ids: list[int], chunk_len: int = DEFAULT_CHUNK_LEN) -> float:
    """The summed next-token cross-entropy (nats) of ids[1:] given what precedes each one."""
    if len(ids) < 2:
        raise RwkvkitError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    return -score_tokens(model, [list(ids)], [len(ids) - 1], chunk_len)[0][0]


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
