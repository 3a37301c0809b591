"""One sequence's decoding: from the logits after each token to the next token and the text to show.

:class:`SequenceDecoder` is the decode core that ``generate``, ``ChatSession`` and the ``Engine`` share;
each of them only feeds the model (one sequence, or a batch whose every row has its own decoder). Per
sequence it owns:

- sampling with its :class:`~rwkvkit.infer.sampling.SamplingParams` (temperature, top-p, top-k, min-p,
  logit bias, bans, presence / frequency penalties with the reference's decay, its own seeded generator);
- stop tokens (never part of the text or of ``tokens``) and ``max_tokens``;
- UTF-8-safe text: token bytes go through the tokenizer's ``IncrementalDecoder``, so a character split
  across tokens is shown once all of its bytes have arrived;
- stop strings held back across tokens (:class:`StopStringFilter`): text that could begin a stop string
  waits until the next tokens show whether it is one, and a stop string is never shown;
- the flush at the end, which releases what is held back (and may still find a stop string in it);
- when asked (``top_logprobs``), each generated token's log-probability and the most likely alternatives
  (:mod:`rwkvkit.infer.logprobs`), the stop token's included;
- an optional ``constraint`` (a grammar matcher, :mod:`rwkvkit.infer.constrained`): tokens it does not
  allow are masked out before sampling (and in the log-probabilities), each token taken advances it, and
  the sequence ends ("stop") as soon as the constrained value is complete.

The loop around it::

    decoder = SequenceDecoder(tokenizer, params, vocab_size=V, max_tokens=n, stop_strings=[...])
    while True:
        out = decoder.step(logits)          # logits (V,) after the last token fed
        show(out.text)
        if out.token is not None:
            logits = feed(out.token)        # the state then covers every generated token
        if out.finish_reason is not None:
            break                           # decoder.finish_reason, decoder.stop, decoder.tokens

A step that ends the sequence by a stop string still returns its token (feeding it is the caller's
choice); a step that ends it otherwise returns no token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.infer.logprobs import TokenLogprob, check_top_logprobs, token_logprob
from rwkvkit.infer.sampling import (
    GREEDY_BELOW,
    SamplingParams,
    TokenPenalty,
    adjust_logits,
    sample_logits,
    sampling_distribution,
    seeded_generator,
    unusable_logits,
)
from rwkvkit.tokenizer import IncrementalDecoder


class StopStringFilter:
    """Holds back text until it is sure it does not begin a stop string; reports the first stop string.

    ``push(text)`` returns (text safe to emit, the stop string found or None). After a stop string is found
    everything from it on is dropped. ``flush()`` returns what is still held back (call it at the end).
    """

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = [s for s in stop_strings]
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        self.pending += text
        first: tuple[int, str] | None = None
        for stop in self.stop_strings:
            at = self.pending.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            emit, self.pending = self.pending[: first[0]], ""
            return emit, first[1]
        cut = len(self.pending) - self._longest_partial_match()
        emit, self.pending = self.pending[:cut], self.pending[cut:]
        return emit, None

    def _longest_partial_match(self) -> int:
        """Length of the longest end of ``pending`` that is the beginning of some stop string."""
        longest = max((len(s) for s in self.stop_strings), default=0)
        for size in range(min(len(self.pending), longest - 1), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stop_strings):
                return size
        return 0

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit


class DecodeStep(NamedTuple):
    """What one :meth:`SequenceDecoder.step` decided."""

    token: int | None  # the generated token, to feed to the model; None when the step generated none
    text: str  # the text to show now ("" while a character or a possible stop string is incomplete)
    finish_reason: str | None  # None while the sequence goes on; else "stop", "length" (or finish()'s)


def check_decoding(
    params: SamplingParams, vocab_size: int, max_tokens: int, stop_strings: Iterable[str]
) -> list[str]:
    """Raise RwkvkitError naming the first bad setting of one sequence; return the stop strings as a list."""
    params.check(vocab_size)
    check_int("max_tokens", max_tokens, 0)
    stops = list(stop_strings)
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise RwkvkitError("stop strings must be non-empty strings")
    return stops


def default_stop_tokens(tokenizer, stop_tokens: Iterable[int] | None) -> frozenset[int]:
    """The stop tokens of a sequence: ``stop_tokens``, or for None the tokenizer's end-of-text id (if any)."""
    if stop_tokens is None:
        eot = getattr(tokenizer, "eot_id", None)
        stop_tokens = () if eot is None else (eot,)
    return frozenset(int(t) for t in stop_tokens)


class SequenceDecoder:
    """The per-sequence decode core (see the module docstring).

    Args:
        tokenizer: decodes the generated ids (``decode_bytes``; its ``vocab_size`` bounds what is sampled:
            ids past it, in a model vocabulary padded beyond the tokenizer's, are never sampled).
        params: how tokens are sampled (None = ``SamplingParams()``); checked against ``vocab_size``.
        vocab_size: the model's vocabulary size.
        max_tokens: the most tokens to generate (>= 0).
        stop_tokens: ids that end the sequence without being part of it; None = the tokenizer's end of text.
        stop_strings: strings that end the sequence and are never shown.
        generator: the random generator to draw from; None = one seeded from ``params.seed`` (or torch's
            global random state without a seed). A chat passes one generator to all of its replies.
        top_logprobs: None = no log-probabilities; else 0-20: record each generated token's
            log-probability with that many alternatives (``logprobs``; pass the logits to :meth:`take`).
        constraint: None, or a matcher with ``mask_logits(logits) -> logits``, ``advance(token)`` and
            ``is_complete()`` (one per sequence).

    Attributes: ``tokens`` (generated so far, stop token excluded), ``pieces`` (the texts shown),
    ``finish_reason`` and ``stop`` (the stop token or stop string that ended it) once finished,
    ``logprobs`` (one entry per generated token, then one for the stop token that ended it, if any).
    """

    def __init__(
        self,
        tokenizer,
        params: SamplingParams | None = None,
        *,
        vocab_size: int,
        max_tokens: int,
        stop_tokens: Iterable[int] | None = None,
        stop_strings: Iterable[str] = (),
        generator: torch.Generator | None = None,
        top_logprobs: int | None = None,
        constraint=None,
    ):
        self.params = params if params is not None else SamplingParams()
        self.constraint = constraint
        if top_logprobs is not None:
            check_top_logprobs("top_logprobs", top_logprobs)
        self.top_logprobs = top_logprobs
        self.logprobs: list[TokenLogprob] = []
        self._unreported = 0  # entries of ``logprobs`` not yet handed out by ``new_logprobs``
        self.max_tokens = max_tokens
        self.stop_strings = check_decoding(self.params, vocab_size, max_tokens, stop_strings)
        self.stop_tokens = default_stop_tokens(tokenizer, stop_tokens)
        self.generator = generator if generator is not None else seeded_generator(self.params.seed)
        self.usable_vocab = min(int(getattr(tokenizer, "vocab_size", vocab_size)), vocab_size)
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.stop: int | str | None = None
        self._text = IncrementalDecoder(tokenizer)
        self._stops = StopStringFilter(self.stop_strings)
        self._penalty: TokenPenalty | None = None

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self.pieces)

    @property
    def exhausted(self) -> bool:
        """Whether ``max_tokens`` tokens have been generated (the next step ends the sequence)."""
        return len(self.tokens) >= self.max_tokens

    @property
    def plain(self) -> bool:
        """Whether sampling needs only the logits and the four filter settings (no bias, bans, penalties)."""
        params = self.params
        return not (
            params.logit_bias or params.banned_tokens or params.penalised or self.constraint is not None
        )

    def scored_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) cut to the usable vocabulary, with this sequence's bias, bans and penalties."""
        logits = logits[: self.usable_vocab]  # (V',)
        params = self.params
        if params.logit_bias or params.banned_tokens or params.penalised:
            logits = adjust_logits(logits, params, self._penalty_on(logits.device))
        if self.constraint is not None:
            logits = self.constraint.mask_logits(logits)
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from ``logits`` (V,) under this sequence's settings (no bookkeeping)."""
        params = self.params
        logits = self.scored_logits(logits)
        return sample_logits(
            logits, params.temperature, params.top_p, params.top_k, self.generator, min_p=params.min_p
        )

    def step(self, logits: torch.Tensor) -> DecodeStep:
        """Sample after ``logits`` (V,), the logits after the last token fed, and do the bookkeeping.

        Raises RwkvkitError when nothing can be sampled (e.g. every token banned); the decoder is then
        unchanged.
        """
        if self.finish_reason is not None:
            raise RwkvkitError(f"this sequence has finished ({self.finish_reason})")
        if self.exhausted:
            return self.finish("length")
        return self.take(self.sample(logits), logits)

    def take(self, token: int, logits: torch.Tensor | None = None) -> DecodeStep:
        """The bookkeeping of :meth:`step` for a ``token`` already sampled (by :meth:`sample` or
        :func:`sample_rows`) while the sequence is neither finished nor exhausted. ``logits`` (V,), the
        ones it was sampled from, are needed when log-probabilities are recorded."""
        if self.top_logprobs is not None:
            if logits is None:
                raise RwkvkitError("take(): this decoder records log-probabilities: pass the logits")
            self.logprobs.append(token_logprob(self.scored_logits(logits), token, self.top_logprobs))
            self._unreported += 1
        if token in self.stop_tokens:
            return self.finish("stop", token)
        self.tokens.append(token)
        if self._penalty is not None:
            self._penalty.update(token, self.params.penalty_decay)
        text, stop = self._stops.push(self._text.feed(token))
        if stop is not None:
            self._end("stop", stop)
        elif self.constraint is not None:
            self.constraint.advance(token)
            if self.constraint.is_complete():  # the value is whole: release the held-back text, stop
                return self._complete(text)
        return DecodeStep(token, self._show(text), self.finish_reason)

    def _complete(self, text: str) -> DecodeStep:
        """End a constrained sequence whose value is complete (its last token is still fed)."""
        tail, stop = self._stops.push(self._text.flush())
        text += tail if stop is not None else tail + self._stops.flush()
        self._end("stop", stop)
        return DecodeStep(self.tokens[-1], self._show(text), "stop")

    def finish(self, reason: str, stop: int | str | None = None) -> DecodeStep:
        """End the sequence now with ``reason`` (e.g. "interrupted") and release the held-back text.

        A stop string found in that text still ends the sequence as "stop" (and is not shown).
        """
        text, late_stop = self._stops.push(self._text.flush())
        if late_stop is not None:
            reason, stop = "stop", late_stop
        else:
            text += self._stops.flush()
        self._end(reason, stop)
        return DecodeStep(None, self._show(text), reason)

    def new_logprobs(self) -> list[TokenLogprob]:
        """The entries of ``logprobs`` recorded since the last call (for streaming them with the text)."""
        if not self._unreported:
            return []
        out = self.logprobs[-self._unreported :]
        self._unreported = 0
        return out

    def _end(self, reason: str, stop: int | str | None) -> None:
        self.finish_reason, self.stop = reason, stop

    def _show(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text

    def _penalty_on(self, device: torch.device) -> TokenPenalty | None:
        """The decaying token counts (created at the first sample, on the logits' device), if penalised."""
        if self._penalty is None and self.params.penalised:
            self._penalty = TokenPenalty(self.usable_vocab, device=device)
        return self._penalty


def sample_rows(decoders: list[SequenceDecoder], logits: torch.Tensor) -> list[int | RwkvkitError]:
    """Each decoder's :meth:`~SequenceDecoder.sample` of its row of ``logits`` (B, V), batched.

    Rows whose decoders are :attr:`~SequenceDecoder.plain` with the same vocabulary and filter settings
    share one softmax / filter; a seeded row then draws from its own generator (the same draw as alone),
    unseeded rows in one draw from torch's global random state. Other rows, and every row of a group
    whose logits are unusable, go through ``sample`` one by one. A row that cannot be sampled gets the
    RwkvkitError that ``sample`` raised.
    """
    out: list[int | RwkvkitError] = [0] * len(decoders)
    groups: dict[tuple, list[int]] = {}
    for i, decoder in enumerate(decoders):
        p = decoder.params
        key = (decoder.usable_vocab, p.temperature, p.top_p, p.top_k, p.min_p) if decoder.plain else None
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        ids = _sample_group(decoders, logits, key, rows) if key is not None and len(rows) > 1 else None
        if ids is None:
            for i in rows:
                try:
                    out[i] = decoders[i].sample(logits[i])
                except RwkvkitError as e:
                    out[i] = e
        else:
            for i, token in zip(rows, ids, strict=True):
                out[i] = token
    return out


def _sample_group(
    decoders: list[SequenceDecoder], logits: torch.Tensor, key: tuple, rows: list[int]
) -> list[int] | None:
    """The tokens of ``rows`` (plain decoders sharing ``key``), or None if some row's logits are unusable."""
    vocab, temperature, top_p, top_k, min_p = key
    if len(rows) < logits.shape[0]:
        logits = logits.index_select(0, torch.tensor(rows, device=logits.device))  # (G, V)
    batch = logits[:, :vocab].float()  # (G, V')
    if unusable_logits(batch):
        return None  # each row alone then raises (or samples) as it would alone
    if temperature < GREEDY_BELOW:
        return batch.argmax(dim=-1).tolist()
    probs = sampling_distribution(batch, temperature, top_p, top_k, min_p)  # (G, V')
    ids = [0] * len(rows)
    unseeded = [j for j, i in enumerate(rows) if decoders[i].generator is None]
    for j, i in enumerate(rows):
        generator = decoders[i].generator
        if generator is not None:
            row = probs[j : j + 1]  # (1, V')
            if generator.device != row.device:
                row = row.to(generator.device)
            ids[j] = int(torch.multinomial(row, num_samples=1, generator=generator))
    if unseeded:
        drawn = torch.multinomial(probs[unseeded], num_samples=1).view(-1).tolist()  # (U,)
        for j, token in zip(unseeded, drawn, strict=True):
            ids[j] = token
    return ids
