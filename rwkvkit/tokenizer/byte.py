"""The byte tokenizer: 256 ids, one per UTF-8 byte, for small models trained from scratch.

This module owns ``ByteTokenizer``. ``encode`` gives the UTF-8 bytes of the text as ids 0..255 and
``decode`` is its exact inverse (bytes that do not form valid UTF-8 become U+FFFD).

End of text: ``eot_id`` is 0, the NUL byte. Training data separates documents with id 0 (the same id the
World tokenizer uses), and generation stops when the model emits it. Text essentially never contains NUL,
so this costs nothing; unlike the World tokenizer's id 0 (which has no bytes), id 0 here still decodes to
"\\x00", so that ``decode(encode(s)) == s`` holds for every string.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer.common import as_id_list


class ByteTokenizer:
    """UTF-8 bytes as ids: ``vocab_size`` 256, ``eot_id`` 0 (the NUL byte, see the module doc)."""

    name = "byte"
    vocab_size = 256
    eot_id = 0

    def __repr__(self) -> str:
        return "ByteTokenizer()"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids 0..255; RwkvkitError for a lone surrogate."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__} (use encode_bytes for bytes)")
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])
            raise RwkvkitError(
                f"text has the lone surrogate U+{code:04X} at index {exc.start}, which has no UTF-8 encoding"
            ) from None

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes as ids (any bytes, valid UTF-8 or not)."""
        return list(bytes(data))

    def token_bytes(self, token_id: int) -> bytes:
        """The single byte of one id."""
        return self.decode_bytes([token_id])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the ids; RwkvkitError for an id outside [0, 256)."""
        ids = as_id_list(ids)
        try:
            return bytes(ids)
        except (ValueError, TypeError):
            pass
        for token_id in ids:
            try:
                valid = 0 <= operator.index(token_id) < 256
            except TypeError:
                valid = False
            if not valid:
                raise RwkvkitError(
                    f"token id {token_id!r} is outside the vocabulary: valid ids are 0..255 (vocab_size=256)"
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
