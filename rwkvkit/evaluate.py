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
import time
from dataclasses import asdict, dataclass

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.generate import prefill
from rwkvkit.state import RWKVState
from rwkvkit.train.chat_data import iter_chat_records

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
    logp, greedy = _token_logprobs(model, sequences, chunk_len, state)
    results = []
    for row, (length, n) in enumerate(zip(lengths, n_scored, strict=True)):
        span = slice(length - 1 - n, length - 1)
        results.append((float(logp[row, span].sum()), bool(greedy[row, span].all())))
    return results


def _token_logprobs(
    model, sequences: list[list[int]], chunk_len: int, state: RWKVState | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(seq[t + 1] | seq[: t + 1]) and whether it is the argmax, for every position of every sequence:
    (B, T) float64 and bool, T = longest length - 1, right-padded with id 0 (positions past a sequence's
    end are meaningless). Runs in chunks of ``chunk_len`` with the state carried."""
    n_pos = max(len(s) for s in sequences) - 1  # input positions
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
    return logp, greedy


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


@dataclass
class ChatEvaluation:
    records: int
    tokens: int  # assistant tokens scored (the targets the SFT loss mask marks)
    bytes: int  # UTF-8 bytes of the scored tokens
    loss: float  # nats per scored token: the masked loss of rwkvkit train on this data
    perplexity: float
    bits_per_byte: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def evaluate_chat(
    model, tokenizer, path, chunk_len: int = DEFAULT_CHUNK_LEN, batch_size: int = 16
) -> ChatEvaluation:
    """The masked loss of a chat ``.jsonl`` file (records with ``messages`` or ``prompt`` + ``completion``,
    rendered as for SFT, :mod:`rwkvkit.train.chat_data`): each record from the initial state, after the
    end-of-text id (as after the record before it in training), scoring only the tokens its loss mask
    marks (the assistant's replies and what ends them)."""
    t0 = time.perf_counter()
    records = [(tokens, mask) for _, tokens, mask in iter_chat_records(path, tokenizer)]
    if not records:
        raise RwkvkitError(f"{path}: no records")
    for tokens, _ in records:
        if tokens.size and int(tokens.max()) >= model.config.vocab_size:
            raise RwkvkitError(
                f"the tokenizer gives id {int(tokens.max())}, outside the model's vocabulary of "
                f"{model.config.vocab_size}; choose the tokenizer the model was trained with"
            )
    nats, scored, n_bytes = 0.0, 0, 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        sequences = [[tokenizer.eot_id, *tokens.tolist()] for tokens, _ in batch]
        logp, _ = _token_logprobs(model, sequences, chunk_len, None)  # (B, T)
        for row, (tokens, mask) in enumerate(batch):
            marked = torch.from_numpy(mask.astype(bool))  # (n,) which targets of the record count
            nats -= float(logp[row, : tokens.size][marked].sum())
            scored += int(marked.sum())
            text_ids = [
                t for t, m in zip(tokens.tolist(), mask.tolist(), strict=True) if m and t != tokenizer.eot_id
            ]
            n_bytes += len(tokenizer.decode_bytes(text_ids))
    if scored == 0:
        raise RwkvkitError(f"{path}: no assistant token to score")
    loss = nats / scored
    return ChatEvaluation(
        records=len(records),
        tokens=scored,
        bytes=n_bytes,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=nats / math.log(2) / max(n_bytes, 1),
        seconds=time.perf_counter() - t0,
    )
