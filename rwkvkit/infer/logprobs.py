"""Token log-probabilities: of generated tokens (from the logits they were sampled from) and of a prompt's
own tokens (scoring, the server's ``echo``).

A :class:`TokenLogprob` holds one token's log-probability and the ``top_n`` most likely alternatives at
its position, all from ONE float32 ``log_softmax`` over the usable vocabulary, so a token that is the most
likely has exactly the top alternative's value (lm-evaluation-harness's greedy check compares them).

Which distribution: for generated tokens, the logits after the request's ``logit_bias``, bans and
presence / frequency penalties (the settings that change what the model is asked to score), before
temperature and the top-p / top-k / min-p filters (which shape the draw, not the scores: with them the
filtered-out tokens would all be -inf). Prompt tokens have no sampling settings: the model's own
distribution. The first prompt token of a sequence with no earlier logits has no log-probability (None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.state import RWKVState

MAX_TOP_LOGPROBS = 20  # as OpenAI's API


def check_top_logprobs(name: str, value: object) -> int:
    """``value`` if it is an integer in [0, MAX_TOP_LOGPROBS]; else RwkvkitError naming ``name``."""
    if check_int(name, value) > MAX_TOP_LOGPROBS:
        raise RwkvkitError(f"{name} must be at most {MAX_TOP_LOGPROBS}, got {value}", param=name)
    return value


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``top_n`` most likely tokens at its position (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """Entries for ``tokens`` (T,) drawn after ``logits`` (T, V) row by row (one log-softmax per row)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    chosen = logp.gather(-1, tokens.view(-1, 1).long()).view(-1).tolist()  # (T,)
    if top_n > 0:
        values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)  # (T, top_n)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [
        TokenLogprob(int(t), float(lp), top) for t, lp, top in zip(tokens.tolist(), chosen, tops, strict=True)
    ]


def token_logprob(logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The entry of ``token`` sampled after ``logits`` (V,)."""
    return logprob_rows(logits.view(1, -1), torch.tensor([token]), top_n)[0]


def score_prompt(
    model,
    tokens: list[int],
    state: RWKVState | None,
    previous_logits: torch.Tensor | None,
    top_n: int,
    vocab: int,
) -> tuple[list[TokenLogprob | None], torch.Tensor, RWKVState]:
    """Run ``tokens`` through ``model`` from ``state`` in one call and score each of them.

    ``previous_logits`` (V,) are the logits before ``tokens[0]`` (None: it gets no entry); only the first
    ``vocab`` ids (the tokenizer's) take part in the softmax. Returns the entries (one per token), the
    logits after the last token (V,) and the new state.
    """
    x = torch.tensor(tokens, dtype=torch.long, device=model.device).view(1, -1)  # (1, T)
    logits, state = model(x, state)  # (1, T, V)
    rows = logits[0, :, :vocab]  # (T, V')
    entries: list[TokenLogprob | None] = []
    if previous_logits is not None:
        entries.append(token_logprob(previous_logits[:vocab], tokens[0], top_n))
    else:
        entries.append(None)
    if len(tokens) > 1:
        entries.extend(logprob_rows(rows[:-1], x[0, 1:], top_n))
    return entries, logits[0, -1].float(), state
