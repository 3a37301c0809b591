"""Constrained decoding for JSON: which tokens may come next so that the output is JSON matching a schema.

This module owns the constraint layer that the engine applies per sequence for ``response_format``
{"type": "json_object"} / {"type": "json_schema", ...} and for tool-call arguments:

* ``compile_json_constraint(tokenizer, schema, vocab_size=V)``: a :class:`JsonGrammar` for a JSON schema
  (``None``: any JSON object). A schema that is not valid, or that uses a feature the grammar compiler
  does not support, raises RwkvkitError (``param="response_format"``) with a one-line message.
* ``JsonGrammar.new_matcher()``: one :class:`JsonMatcher` per sequence. Per generated token the caller
  asks for the mask (``allowed_mask()`` or ``mask_logits(logits)``), samples, then ``advance(token)``.
* The end-of-text token (``tokenizer.eot_id``) is allowed exactly when the JSON value is complete, and then
  it is the only token allowed; ids at or above the tokenizer's vocab (a model's padding rows) never are.

The grammar engine is llguidance (an optional dependency: ``pip install 'rwkvkit[serve]'``), imported on
first use. It works on raw token bytes, so tokens that hold part of a UTF-8 character (the World vocab
has 486) are allowed exactly where the bytes can still become valid UTF-8 inside a JSON string. Its
tokenizer object (the token trie, ~0.1-0.5 s to build for 65536 tokens) is built once per tokenizer
(vocab file and size) and cached for the process; compiling a schema takes about a millisecond.

Whitespace between JSON tokens is allowed (so a model may pretty-print), at most ``MAX_WHITESPACE``
characters at each place, so that a model cannot loop on whitespace forever.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rwkvkit.errors import RwkvkitError

__all__ = ["MAX_WHITESPACE", "JsonGrammar", "JsonMatcher", "compile_json_constraint"]

MAX_WHITESPACE = 24  # JSON whitespace characters allowed at one place (between two JSON tokens)
_EOT_MARK = b"\xff<|endoftext|>"  # llguidance treats a token whose bytes start with 0xff as special
_PARAM = "response_format"

# (tokenizer class, vocab path, vocab size) -> llguidance.LLTokenizer
_LLTOKENIZERS: dict[tuple[str, str, int], Any] = {}
_LLTOKENIZERS_LOCK = threading.Lock()


def _llguidance() -> ModuleType:
    try:
        import llguidance
    except ImportError:
        raise RwkvkitError(
            "JSON mode / JSON schema output needs the llguidance package: pip install 'rwkvkit[serve]' "
            "(or pip install llguidance)"
        ) from None
    return llguidance


def _token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes of every id in [0, tokenizer.vocab_size), end of text marked special for llguidance."""
    get = getattr(tokenizer, "token_bytes", None)
    if get is None:
        tokens = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
    else:
        tokens = [get(i) for i in range(tokenizer.vocab_size)]
    tokens[tokenizer.eot_id] = _EOT_MARK
    return tokens


def _lltokenizer(llg: ModuleType, tokenizer: Any) -> Any:
    """The llguidance tokenizer for ``tokenizer``, built on first use and cached for the process."""
    key = (type(tokenizer).__qualname__, str(getattr(tokenizer, "path", "")), int(tokenizer.vocab_size))
    with _LLTOKENIZERS_LOCK:
        cached = _LLTOKENIZERS.get(key)
        if cached is None:
            encode_bytes = getattr(tokenizer, "encode_bytes", None)

            class _Source:  # what llguidance.TokenizerWrapper reads
                eos_token_id = tokenizer.eot_id
                bos_token_id = None
                special_token_ids = [tokenizer.eot_id]
                tokens = _token_bytes(tokenizer)

                def __call__(self, data: bytes) -> list[int]:
                    if encode_bytes is not None:
                        return encode_bytes(data)
                    return tokenizer.encode(data.decode("utf-8", errors="replace"))

            cached = _LLTOKENIZERS[key] = llg.LLTokenizer(llg.TokenizerWrapper(_Source()))
        return cached


def compile_json_constraint(tokenizer: Any, schema: dict[str, Any] | None, *, vocab_size: int) -> JsonGrammar:
    """A grammar for JSON matching ``schema`` (``None``: any JSON object, i.e. json_object mode).

    ``tokenizer``: the model's tokenizer (``token_bytes`` / ``decode_bytes``, ``vocab_size``, ``eot_id``).
    ``vocab_size``: the model's number of logits, which may exceed the tokenizer's (padding rows, never
    allowed). Raises RwkvkitError (``param="response_format"``) for a schema that is not a JSON object,
    is not a valid JSON schema, or uses an unsupported feature (the message says which).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise RwkvkitError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
    if schema is not None and not isinstance(schema, dict):
        raise RwkvkitError(
            f"the JSON schema must be a JSON object, got {type(schema).__name__}", param=_PARAM
        )
    llg = _llguidance()
    lltok = _lltokenizer(llg, tokenizer)
    options = {"whitespace_pattern": f"[\\x20\\x0A\\x0D\\x09]{{1,{MAX_WHITESPACE}}}"}
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema, overrides=options
        )
    except (ValueError, TypeError) as exc:
        raise RwkvkitError(f"invalid JSON schema: {_one_line(exc)}", param=_PARAM) from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        raise RwkvkitError(f"invalid JSON schema: {_one_line(messages[0])}", param=_PARAM)
    return JsonGrammar(llg, lltok, grammar, vocab_size=vocab_size, eot_id=tokenizer.eot_id)


def _one_line(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonGrammar:
    """A compiled JSON constraint; cheap to keep, shared by every sequence of a request (thread-safe)."""

    def __init__(self, llg: ModuleType, lltok: Any, grammar: str, *, vocab_size: int, eot_id: int) -> None:
        self._llg = llg
        self._lltok = lltok
        self._grammar = grammar
        self.vocab_size = vocab_size  # the model's logits
        self.eot_id = eot_id
        self.tokenizer_vocab_size = int(lltok.vocab_size)

    def new_matcher(self) -> JsonMatcher:
        """The state of one sequence, at the start of the JSON value."""
        limits = self._llg.LLParserLimits(verbose_errors=False)  # errors in one line, no parser dump
        matcher = self._llg.LLMatcher(self._lltok, self._grammar, log_level=0, limits=limits)
        if matcher.is_error():  # not expected: the grammar was validated when compiled
            raise RwkvkitError(f"invalid JSON schema: {_one_line(matcher.get_error())}", param=_PARAM)
        return JsonMatcher(matcher, self)


class JsonMatcher:
    """One sequence's position in the JSON grammar: the mask of allowed next tokens, and advancing by one.

    Per step: ``allowed_mask()`` (or ``mask_logits(logits)``), sample, ``advance(token)``. The mask is
    computed once per position (a second call returns the same tensor); mask + advance cost ~50-70 us a
    token for 65536 tokens (benchmarks/RESULTS.md), most of it llguidance's mask and the bool unpacking.
    """

    def __init__(self, matcher: Any, grammar: JsonGrammar) -> None:
        self._m = matcher
        self.grammar = grammar
        n = grammar.tokenizer_vocab_size
        self._bits = np.zeros((n + 31) // 32, dtype=np.int32)  # (ceil(n/32),) llguidance's bitmask
        self._mask: torch.Tensor | None = None  # (V,) bool, for the current position
        self._n = min(n, grammar.vocab_size)  # ids that the model and the tokenizer both have
        self._refused = ""  # why advance() refused an id outside the vocabulary (not llguidance's errors)

    def allowed_mask(self) -> torch.Tensor:
        """(vocab_size,) bool on the CPU: True for each token that may come next. Do not modify it."""
        if self._mask is None:
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            # numpy, not torch: a few small ops cost less there (torch's per-op overhead dominates at 64K)
            bits = np.unpackbits(self._bits.view(np.uint8), count=self._n, bitorder="little")  # (n,) 0/1
            mask = np.zeros(self.grammar.vocab_size, dtype=np.bool_)  # (V,) padding rows stay False
            mask[: self._n] = bits.view(np.bool_)
            self._mask = torch.from_numpy(mask)
        return self._mask

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of disallowed tokens to -inf, in place; ``logits`` (..., vocab_size). Returns it."""
        if logits.shape[-1] != self.grammar.vocab_size:
            raise RwkvkitError(
                f"logits have {logits.shape[-1]} entries but the JSON constraint was compiled for "
                f"vocab_size={self.grammar.vocab_size}"
            )
        mask = self.allowed_mask().to(logits.device, non_blocking=True)
        return logits.masked_fill_(~mask, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Move past ``token_id``; RwkvkitError (and the matcher is dead) if the grammar does not allow it."""
        self._mask = None
        if self.is_dead():
            raise RwkvkitError(f"the JSON constraint is dead (an earlier token did not fit): {self.error}")
        if not 0 <= token_id < self._n:
            self._refused = f"token {token_id} is outside the vocabulary (0..{self._n - 1})"
            raise RwkvkitError(f"the JSON constraint refused a token: {self._refused}")
        if not self._m.consume_token(int(token_id)):
            raise RwkvkitError(f"the JSON constraint refused token {token_id}: {self.error}")

    def is_complete(self) -> bool:
        """True when the JSON value is finished and valid (end of text is then the only allowed token)."""
        return not self.is_dead() and self._m.is_accepting()

    def is_stopped(self) -> bool:
        """True when no token but end of text can follow (the value is complete), or the matcher is dead."""
        return self.is_dead() or self._m.is_stopped()

    def is_dead(self) -> bool:
        """True after a token the grammar did not allow (or a parser limit was hit): nothing more fits."""
        return bool(self._refused) or self._m.is_error()

    @property
    def error(self) -> str:
        """Why the matcher is dead ("" while it is not), one line."""
        if self._refused:
            return self._refused
        if not self._m.is_error():
            return ""
        lines = self._m.get_error().strip().splitlines()
        return _one_line(lines[0] if lines else "unknown error")
