"""Text generation: prefill a prompt in chunks, then decode one token at a time with the carried state.

``generate(...)`` returns a :class:`GenerationStream`, an iterator of text pieces that can be shown as
they arrive; when it is exhausted its ``result`` holds a :class:`GenerationResult` (full text, token ids,
finish reason, final state). ``generate_text(...)`` does both in one call. The per-token work (sampling,
stop tokens and strings, text) is :class:`rwkvkit.infer.decoding.SequenceDecoder`'s; this module feeds the
model: the chunked prefill (``prefill``, ``prefill_spans``, shared with the engine and the prefix cache)
and one token at a time after it.

Guarantees:
- Every piece is valid UTF-8 text: token bytes go through the tokenizer's ``IncrementalDecoder``, which
  holds back a multi-byte character until all of its bytes have arrived.
- A stop token ends generation and is not part of the text or of ``tokens``.
- A stop string ends generation and is never emitted, even when it spans several tokens: text that could
  be the start of a stop string is held back until the next tokens show whether it is one.
- The final state has consumed the prompt and every id in ``result.tokens`` (including the tokens that
  formed a stop string), so a conversation can continue from it with the next prompt.
- Memory is bounded for any prompt length: the prompt runs through the model in chunks of at most
  ``prefill_chunk`` tokens with ``last_only=True``, so only the final position's logits are computed.

An empty prompt is an error even when a state is given: the state does not hold the logits of the
token that produced it, so there is nothing to sample the first token from. To continue from a state,
pass the text that follows it (e.g. the next user turn) as the prompt.

Model calls run under ``torch.inference_mode()`` one at a time (never across a ``yield``, so the caller's
code between pieces is not affected); the returned state therefore holds inference tensors.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from rwkvkit.blas import cpu_has_bf16_math
from rwkvkit.errors import RwkvkitError, check_int
from rwkvkit.infer.decoding import SequenceDecoder
from rwkvkit.infer.decoding import StopStringFilter as StopStringFilter  # re-exported: it lived here
from rwkvkit.infer.sampling import SamplingParams, resolve_sampling
from rwkvkit.state import RWKVState

# Generation defaults (the CLI repeats them for its --help without importing torch; a test keeps them equal).
DEFAULT_MAX_TOKENS = 200
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.85  # the reference package's default
DEFAULT_TOP_K = 0  # no limit
DEFAULT_PREFILL_CHUNK = 256  # the reference package's prefill chunk length
# what generate samples with when neither sampling= nor a loose argument says otherwise
SAMPLING_DEFAULTS = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, "top_k": DEFAULT_TOP_K}


@dataclass
class GenerationResult:
    """What one generation produced.

    text: everything emitted (stop strings and what follows them excluded).
    tokens: the generated ids, stop token excluded; the final state has consumed all of them.
    finish_reason: "stop" (stop token or stop string) or "length" (max_tokens reached).
    stop: the stop token (int) or stop string (str) that ended generation, else None.
    state: the recurrent state after the prompt and ``tokens``.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    state: RWKVState
    prompt_tokens: int
    stop: int | str | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class GenerationStream:
    """Iterator over the text pieces of one generation; ``result`` is set once it is exhausted."""

    def __init__(self, pieces: Generator[str, None, GenerationResult]):
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def close(self) -> None:
        """Stop early (``result`` stays None)."""
        self._pieces.close()


@torch.inference_mode()
def _forward(model, tokens: list[int], state: RWKVState | None) -> tuple[torch.Tensor, RWKVState]:
    """Run ``tokens`` from ``state``; return the logits after the last token (V,) and the new state."""
    x = torch.tensor([tokens], dtype=torch.long, device=model.device)  # (1, T)
    logits, state = model(x, state, last_only=True)  # logits (1, 1, V)
    return logits[0, -1], state


def bf16_prefill_supported(model) -> bool:
    """Whether bf16 prefill pays on this model's device: a CPU with native bf16 arithmetic
    (AVX512-BF16 or AMX; torch.cpu reports it) and an fp32 model (a bf16 model is bf16 already)."""
    return model.device.type == "cpu" and model.dtype == torch.float32 and cpu_has_bf16_math()


def prefill_precision(model, bf16: bool):
    """The context prefill runs in: bf16 autocast of the matmuls (the WKV recurrence, norms and state
    stay fp32) when ``bf16`` is asked for and :func:`bf16_prefill_supported`, else nothing."""
    if bf16 and bf16_prefill_supported(model):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prefill(
    model,
    tokens: Sequence[int],
    state: RWKVState | None = None,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    bf16: bool = False,
) -> tuple[torch.Tensor, RWKVState]:
    """Run ``tokens`` through the model in chunks of at most ``chunk_size``, carrying the state.

    ``bf16`` runs the matmuls in bf16 where the CPU does bf16 natively (:func:`prefill_precision`:
    ~1.6x faster prompts on an AVX512-BF16 CPU; results within bf16 rounding of fp32).
    Returns (logits after the last token, float32 (V,), state after all tokens).
    """
    if len(tokens) == 0:
        raise RwkvkitError("empty prompt: at least one token is needed")
    check_int("chunk_size", chunk_size, 1)
    logits = None
    with prefill_precision(model, bf16):
        for start, end in prefill_spans(0, len(tokens), chunk_size):
            logits, state = _forward(model, list(tokens[start:end]), state)
    return logits.float(), state


def prefill_spans(
    start: int, stop: int, chunk_size: int, block_size: int | None = None
) -> Iterator[tuple[int, int]]:
    """The (start, end) token spans a prefill of positions [start, stop) runs, in order: at most
    ``chunk_size`` tokens each, and none crossing a multiple of ``block_size`` (a prefix cache's block
    boundaries, where its states are kept) when one is given."""
    while start < stop:
        end = min(stop, start + chunk_size)
        if block_size is not None:
            end = min(end, (start // block_size + 1) * block_size)  # the next block boundary
        yield start, end
        start = end


def _prompt_tokens(tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        tokens = tokenizer.encode(prompt) if prompt else []
    else:
        tokens = []
        for t in prompt:
            try:
                tokens.append(operator.index(t))  # int, numpy integer, 0-d integer tensor
            except TypeError:
                raise RwkvkitError(f"prompt token ids must be integers, got {t!r}") from None
    if not tokens:
        raise RwkvkitError(
            "empty prompt: at least one token is needed to start generating (a state alone holds no "
            "next-token logits; pass the text that follows it)"
        )
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise RwkvkitError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
    return tokens


def generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stop_strings: Iterable[str] = (),
    state: RWKVState | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    bf16_prefill: bool = False,
    *,
    sampling: SamplingParams | None = None,
) -> GenerationStream:
    """Generate text after ``prompt``, streamed as pieces of valid text.

    Args:
        model: an RWKV model (``logits, state = model(tokens (B, T), state, last_only=...)``).
        tokenizer: encodes the prompt and decodes the generated ids (see ``rwkvkit.tokenizer``).
        prompt: text, or token ids. Must not be empty.
        max_tokens: the most tokens to generate (>= 0).
        sampling: how tokens are sampled (``SamplingParams``: temperature 0 = greedy, top-p/k, min-p,
            penalties, logit bias, bans, seed).
        temperature, top_p, top_k, seed: the older spelling of ``sampling`` (kept for a release; not
            together with it): a SamplingParams with these, defaulting to DEFAULT_TEMPERATURE,
            DEFAULT_TOP_P, DEFAULT_TOP_K and no seed (torch's global random state).
        stop_tokens: ids that end generation without being emitted. None means the tokenizer's
            end-of-text id (0); pass () to disable.
        stop_strings: strings that end generation; they are never emitted, even across tokens.
        state: the state to start from (None = a fresh sequence). It is not modified.
        prefill_chunk: the most prompt tokens run through the model at once.
        bf16_prefill: run the prompt's matmuls in bf16 where the CPU does bf16 natively (faster, within
            bf16 rounding of fp32; see :func:`prefill`).
    Returns a GenerationStream; iterate it for the pieces, then read ``.result``.
    Raises RwkvkitError for an empty prompt, out-of-vocabulary ids, an incompatible state or bad parameters
    (checked here, before anything runs).
    """
    params = resolve_sampling(
        sampling, SAMPLING_DEFAULTS, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    vocab_size = model.config.vocab_size
    decoder = SequenceDecoder(
        tokenizer,
        params,
        vocab_size=vocab_size,
        max_tokens=max_tokens,
        stop_tokens=stop_tokens,
        stop_strings=stop_strings,
    )
    check_int("prefill_chunk", prefill_chunk, 1)
    tokens = _prompt_tokens(tokenizer, prompt, vocab_size)
    if state is not None:
        state.check_compatible(model.config, 1)
    return GenerationStream(_run(model, tokens, state, decoder, prefill_chunk, bf16_prefill))


def _run(
    model,
    prompt: list[int],
    state: RWKVState | None,
    decoder: SequenceDecoder,
    prefill_chunk: int,
    bf16_prefill: bool,
) -> Generator[str, None, GenerationResult]:
    t0 = time.perf_counter()
    logits, state = prefill(model, prompt, state, prefill_chunk, bf16=bf16_prefill)  # logits (V,)
    t1 = time.perf_counter()
    while True:
        out = decoder.step(logits)
        if out.text:
            yield out.text
        if out.token is not None:  # the state always covers every generated token
            logits, state = _forward(model, [out.token], state)
        if out.finish_reason is not None:
            break
    t2 = time.perf_counter()
    return GenerationResult(
        text=decoder.text,
        tokens=list(decoder.tokens),
        finish_reason=decoder.finish_reason,
        state=state,
        prompt_tokens=len(prompt),
        stop=decoder.stop,
        prefill_seconds=t1 - t0,
        decode_seconds=t2 - t1,
    )


def generate_text(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> GenerationResult:
    """Run :func:`generate` to the end and return its GenerationResult (same keyword arguments)."""
    stream = generate(model, tokenizer, prompt, **kwargs)
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result
