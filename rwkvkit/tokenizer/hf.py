"""Hugging Face ``tokenizers`` JSON files (tokenizer.json), e.g. the GPT-NeoX 20B BPE of RWKV-4 Pile models.

This module owns ``HFTokenizer``: loading a tokenizer.json with the ``tokenizers`` package (an optional
dependency, ``pip install 'rwkvkit[neox]'``, imported only when an ``HFTokenizer`` is made), checking the
file first so that a bad file gives a one-line RwkvkitError instead of a traceback, and decoding ids to
the exact bytes of their tokens.

Exact bytes
-----------
``IncrementalDecoder`` needs the bytes of each token: one character may be split across tokens, and a
token's text alone would be U+FFFD. Byte-level BPE tokenizers (GPT-2 / GPT-NeoX style: a pre-tokenizer
or decoder of type ByteLevel) store every byte as one printable character; ``decode_bytes`` maps each
character of a token back to its byte through the inverse of the GPT-2 byte <-> character table (below),
so the bytes are exact. Added tokens (``<|endoftext|>``, NeoX's runs of spaces) are matched on the raw
text, so they decode to the UTF-8 of their content. A token with a character outside the table (never
in a well-formed byte-level vocab) decodes to its UTF-8, as the ``tokenizers`` ByteLevel decoder does.

Other tokenizers (WordPiece, Metaspace / SentencePiece-style BPE, ...) have no such table: there
``decode_bytes`` is ``decode([id]).encode("utf-8")`` per token, so streaming them is only approximate
(a character split across byte-fallback tokens, or spacing that the decoder adds between tokens, is not
reproduced), and ``decode`` is the library's own decode of the whole sequence.

End of text: ``eot_id`` is the id of ``<|endoftext|>`` (0 for GPT-NeoX), or 0 if the vocab has no such
token. ``encode`` adds no special tokens (``add_special_tokens=False``), but the library still turns the
literal text ``<|endoftext|>`` (or any added token) in the input into its id, as the reference RWKV-4
pipeline does.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer.common import as_id_list, read_text_file

if TYPE_CHECKING:
    import tokenizers

EOT_TOKEN = "<|endoftext|>"
INSTALL_HINT = "pip install 'rwkvkit[neox]'"


def _byte_to_char_table() -> dict[int, str]:
    """The GPT-2 byte-level table: every byte value gets one printable, non-space character.

    Bytes that are printable Latin-1 characters other than the space ('!'..'~', '¡'..'¬', '®'..'ÿ') stand
    for themselves; the other 68 (controls, space, DEL, 0x80..0xA0, the soft hyphen 0xAD) take the
    characters U+0100, U+0101, ... in increasing byte order, so the space is 'Ġ' (U+0120), '\\n' 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 0x100)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    for offset, b in enumerate(others):
        table[b] = chr(0x100 + offset)
    return table


_BYTE_TO_CHAR = _byte_to_char_table()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _mentions_byte_level(node: Any) -> bool:
    """True if this pre-tokenizer / decoder entry is of type ByteLevel or a Sequence holding one."""
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_mentions_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_mentions_byte_level(v) for v in node)
    return False


def _read_tokenizer_json(path: Path) -> tuple[str, dict[str, Any]]:
    """The text and parsed JSON of a tokenizer file; RwkvkitError naming the file for any problem."""
    if path.is_dir():
        hint = path / "tokenizer.json"
        more = f" (did you mean {hint}?)" if hint.is_file() else ""
        raise RwkvkitError(f"tokenizer path {path} is a directory, not a tokenizer.json file{more}")
    text = read_text_file(path, "tokenizer file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RwkvkitError(
            f"tokenizer file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise RwkvkitError(f"tokenizer file {path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise RwkvkitError(
            f'{path} is JSON but not a Hugging Face tokenizer file: it has no "model" object '
            "(expected a tokenizer.json saved by the tokenizers library)"
        )
    return text, data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class HFTokenizer:
    """A Hugging Face tokenizer.json (e.g. GPT-NeoX ``20B_tokenizer.json``); see the module doc.

    ``vocab_size`` is ``get_vocab_size(with_added_tokens=True)``, or the largest id + 1 if that is larger
    (a vocab with gaps in its ids); ids below it without a token decode to nothing. The file is read and
    checked here, then parsed with ``tokenizers.Tokenizer.from_str`` (``from_file`` without a second read).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        try:
            import tokenizers
        except ImportError:
            raise RwkvkitError(
                f"the tokenizer file {self._path} needs the 'tokenizers' package: {INSTALL_HINT}"
            ) from None
        text, data = _read_tokenizer_json(self._path)
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise RwkvkitError(
                f"{self._path} is not a valid Hugging Face tokenizer file: {_first_line(exc)}"
            ) from None
        self._tok: tokenizers.Tokenizer = tok
        self.name = f"hf:{self._path.name}"
        self.byte_level = _mentions_byte_level(data.get("pre_tokenizer")) or _mentions_byte_level(
            data.get("decoder")
        )
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise RwkvkitError(f"tokenizer file {self._path} has an empty vocabulary")
        self.vocab_size: int = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        eot = tok.token_to_id(EOT_TOKEN)
        self.eot_id: int = 0 if eot is None else eot
        # id -> bytes: the whole table for a byte-level vocab (built on the first decode), else filled
        # one id at a time.
        self._id_to_bytes: dict[int, bytes] = {}
        self._table_built = False

    @property
    def path(self) -> Path:
        """The tokenizer file this tokenizer was loaded from."""
        return self._path

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(path={str(self._path)!r}, vocab_size={self.vocab_size}, "
            f"byte_level={self.byte_level})"
        )

    # ---- encoding ----
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added (``add_special_tokens=False``).

        RwkvkitError if the text holds a lone surrogate (it has no UTF-8 encoding).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as exc:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as enc:
                code = ord(text[enc.start])
                raise RwkvkitError(
                    f"text has the lone surrogate U+{code:04X} at index {enc.start}, "
                    "which has no UTF-8 encoding"
                ) from None
            raise RwkvkitError(f"tokenizer {self.name} cannot encode the text: {_first_line(exc)}") from None

    # ---- decoding ----
    def _build_table(self) -> None:
        tok = self._tok
        added = {i: t.content.encode("utf-8") for i, t in tok.get_added_tokens_decoder().items()}
        table: dict[int, bytes] = {}
        for token_id in range(self.vocab_size):
            data = added.get(token_id)
            if data is None:
                token = tok.id_to_token(token_id)
                if token is None:
                    data = b""  # a gap in the ids
                else:
                    try:
                        data = bytes(map(_CHAR_TO_BYTE.__getitem__, token))
                    except KeyError:
                        data = token.encode("utf-8")
            table[token_id] = data
        self._id_to_bytes = table
        self._table_built = True

    def _bad_id(self, token_id: object) -> RwkvkitError:
        return RwkvkitError(
            f"token id {token_id!r} is outside the vocabulary: valid ids are 0..{self.vocab_size - 1} "
            f"(vocab_size={self.vocab_size})"
        )

    def _check_id(self, token_id: Any) -> int:
        try:
            index = operator.index(token_id)
        except TypeError:
            raise self._bad_id(token_id) from None
        if not 0 <= index < self.vocab_size:
            raise self._bad_id(token_id)
        return index

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (see the module doc for tokenizers that are not byte-level)."""
        if self.byte_level:
            if not self._table_built:
                self._build_table()
            try:
                return self._id_to_bytes[token_id]
            except (KeyError, TypeError):
                raise self._bad_id(token_id) from None
        data = self._id_to_bytes.get(token_id) if isinstance(token_id, int) else None
        if data is None:
            index = self._check_id(token_id)
            data = self._tok.decode([index], skip_special_tokens=False).encode("utf-8")
            self._id_to_bytes[index] = data
        return data

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The tokens' bytes, concatenated; RwkvkitError for an id outside [0, vocab_size)."""
        ids = as_id_list(ids)
        if self.byte_level:
            if not self._table_built:
                self._build_table()
            try:
                return b"".join(map(self._id_to_bytes.__getitem__, ids))
            except (KeyError, TypeError):
                pass
        return b"".join(map(self.token_bytes, ids))  # raises for the first bad id

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens' text, special tokens included; invalid UTF-8 (partial characters) becomes U+FFFD.

        Byte-level: the UTF-8 decoding of ``decode_bytes``. Otherwise: the library's decode.
        """
        ids = as_id_list(ids)
        if self.byte_level:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        return self._tok.decode([self._check_id(i) for i in ids], skip_special_tokens=False)
