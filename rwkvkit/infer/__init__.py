"""Inference: next-token sampling (``sampling.py``), one sequence's decode core (``decoding.py``),
streamed text generation (``generate.py``), the continuous-batching engine (``engine.py``), the
prefix-state cache (``cache.py``), the World chat format (``chat_format.py``), chat sessions (``chat.py``)
and the OpenAI-compatible server (``server/``, needs the ``serve`` extra).

    from rwkvkit.infer import generate, generate_text, sample_logits

(Imported eagerly: a lazy ``generate`` attribute would be shadowed by the ``generate`` submodule.)
"""

from __future__ import annotations

from rwkvkit.infer.decoding import SequenceDecoder, StopStringFilter
from rwkvkit.infer.generate import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    GenerationResult,
    GenerationStream,
    generate,
    generate_text,
    prefill,
)
from rwkvkit.infer.sampling import SamplingParams, check_sampling_args, sample_logits, sampling_distribution

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PREFILL_CHUNK",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "GenerationResult",
    "GenerationStream",
    "SamplingParams",
    "SequenceDecoder",
    "StopStringFilter",
    "check_sampling_args",
    "generate",
    "generate_text",
    "prefill",
    "sample_logits",
    "sampling_distribution",
]
