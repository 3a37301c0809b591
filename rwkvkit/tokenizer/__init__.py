"""Tokenizers: RWKV World, byte, Hugging Face tokenizer.json files, and a streaming decoder for all of them.

This package owns the tokenizer API shared by training and inference:

* ``WorldTokenizer`` (world.py): the 65536-id RWKV World vocab, byte-exact with the reference ``rwkv``
  package; ``ByteTokenizer`` (byte.py): 256 ids, one per UTF-8 byte; ``HFTokenizer`` (hf.py): a Hugging
  Face ``tokenizers`` JSON file, such as the GPT-NeoX 20B BPE of RWKV-4 Pile models (needs the optional
  ``tokenizers`` package: ``pip install 'rwkvkit[neox]'``).
* ``Tokenizer``: the protocol they follow (encode / decode / decode_bytes, ``vocab_size``, ``eot_id``).
* ``IncrementalDecoder``: turns a stream of ids into text without ever splitting a UTF-8 character.
* ``load_tokenizer(name_or_path)``: "world", "byte", the path of a ``.json`` tokenizer file, or the path
  of a World-format vocab file.
* common.py: what the tokenizer modules share (reading a tokenizer file with one-line errors, id lists).

Importing this package is cheap: the World vocab is read on the first ``WorldTokenizer()``, and
``tokenizers`` is imported on the first ``HFTokenizer()``.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer.byte import ByteTokenizer
from rwkvkit.tokenizer.hf import HFTokenizer
from rwkvkit.tokenizer.world import WorldTokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "IncrementalDecoder",
    "Tokenizer",
    "WorldTokenizer",
    "load_tokenizer",
]

TOKENIZER_NAMES = ("world", "byte")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of rwkvkit needs from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> WorldTokenizer | ByteTokenizer | HFTokenizer:
    """A tokenizer by name: ``"world"``, ``"byte"``, or the path of a tokenizer file.

    A path ending in ``.json`` is a Hugging Face tokenizer.json (``HFTokenizer``, which reports a missing
    or malformed file itself); any other existing file is a World-format vocab (``WorldTokenizer``).
    """
    name = os.fspath(name_or_path)
    if name == "world":
        return WorldTokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name.lower().endswith(".json"):
        return HFTokenizer(name)
    if Path(name).is_file():
        return WorldTokenizer(name)
    raise RwkvkitError(
        f"unknown tokenizer {name!r}: expected {' or '.join(TOKENIZER_NAMES)}, the path of a Hugging Face "
        "tokenizer.json file, or the path of a World-format vocab file"
    )


class IncrementalDecoder:
    """Streaming detokenizer: feed ids as they are generated, get back only complete characters.

    Bytes of an unfinished UTF-8 sequence (a token may end in the middle of a character) are held back
    until the sequence completes. Bytes that can never become valid UTF-8 (a stray continuation byte, a
    lead byte followed by a non-continuation byte, ...) are emitted as U+FFFD at once, never held.
    ``flush()`` returns what is left (U+FFFD for an unfinished sequence). The concatenation of all outputs
    and ``flush()`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text that is now complete (possibly "")."""
        data = self.tokenizer.decode_bytes([ids] if isinstance(ids, int) else ids)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Return the held-back bytes (as U+FFFD: they never completed) and start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    def reset(self) -> None:
        """Drop any held-back bytes."""
        self._utf8.reset()

    @property
    def pending(self) -> bytes:
        """The bytes held back, waiting for the rest of their character."""
        return self._utf8.getstate()[0]


TOKENIZER_BY_VOCAB = {65536: "world", 256: "byte"}  # the built-in tokenizer of each vocabulary size


def default_tokenizer(vocab_size: int) -> str:
    """The built-in tokenizer for a vocabulary size (RwkvkitError when none matches)."""
    name = TOKENIZER_BY_VOCAB.get(vocab_size)
    if name is None:
        raise RwkvkitError(
            f"the model's vocabulary has {vocab_size} tokens, which matches no built-in tokenizer "
            "(world: 65536, byte: 256); choose one with --tokenizer"
        )
    return name
