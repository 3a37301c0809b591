"""The RWKV World tokenizer (rwkv_vocab_v20230424) as a Hugging Face transformers tokenizer.

This module owns ``RwkvWorldTokenizer``, a ``transformers.PreTrainedTokenizer`` that gives the same ids as
rwkvkit's ``WorldTokenizer`` and the reference ``rwkv`` package: the greedy longest match over the UTF-8
bytes of the text (at each position, the longest vocab token that the bytes there start with).

It is self-contained (the standard library and transformers only), because it is copied verbatim into
exported model folders as remote code: ``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``
then works without rwkvkit. Where rwkvkit is importable, encoding uses its fast Aho-Corasick encoder;
otherwise this module's own byte trie (same ids, slower).

Tokens: each token is a str with one character per byte (latin-1), so any bytes survive the round trip;
``convert_tokens_to_string`` joins the bytes and decodes them as UTF-8, with U+FFFD only for bytes that
are not valid UTF-8 (a character split off at the end). Id 0 is end of text, ``<|endoftext|>``: it is
not in the vocab file, it is the bos, eos and pad token, and it decodes to "" (as rwkvkit's decode).
Nothing is added to the input (no bos / eos, no prefix space, no normalisation), and the literal text
``<|endoftext|>`` is encoded as ordinary bytes (``split_special_tokens=True``), like RWKV does.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil

from transformers import PreTrainedTokenizer

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
EOT_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 1_000_000_000  # RWKV has no context limit; this only keeps transformers from warning


def parse_world_vocab(path: str | os.PathLike[str]) -> dict[int, bytes]:
    """``{id: token bytes}`` of a World vocab file (lines ``<id> <str or bytes literal> <byte length>``).

    ValueError naming the file and line for a malformed line, a byte length that does not match the
    token, an empty token, an id below 1 (0 is end of text) or a repeated id or token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the RWKV World vocab file {path}: {exc}") from None
    id_to_bytes: dict[int, bytes] = {}
    seen: set[bytes] = set()
    for lineno, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        idx, token = _parse_vocab_line(line, where)
        if idx in id_to_bytes or token in seen:
            raise ValueError(f"{where}: id {idx} or its token {token!r} appears twice")
        id_to_bytes[idx] = token
        seen.add(token)
    if not id_to_bytes:
        raise ValueError(f"the RWKV World vocab file {path} has no tokens")
    return id_to_bytes


def _parse_vocab_line(line: str, where: str) -> tuple[int, bytes]:
    """(id, token bytes) of one vocab line; ValueError if it is malformed."""
    first, last = line.find(" "), line.rfind(" ")
    if first <= 0 or last <= first:
        raise ValueError(f"{where}: expected '<id> <literal> <byte length>', got {line[:80]!r}")
    try:
        idx, length = int(line[:first]), int(line[last + 1 :])
    except ValueError:
        raise ValueError(f"{where}: the id and byte length must be integers: {line[:80]!r}") from None
    literal = line[first + 1 : last]
    quote, inner = literal[:1], literal[1:-1]
    if (
        quote in ("'", '"')
        and len(literal) >= 2
        and literal[-1] == quote
        and not any(c in inner for c in ("\\", "\r", quote))
    ):
        value: object = inner  # a quoted str with no backslash, CR or quote inside means its inner text
    else:
        try:
            value = ast.literal_eval(literal)  # a Python str or bytes literal; never eval
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{where}: cannot parse the token literal {literal[:60]!r}") from None
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: the token {literal[:60]!r} has no UTF-8 encoding") from None
    if not isinstance(value, bytes):
        raise ValueError(f"{where}: expected a str or bytes literal, got {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{where}: the token is {len(value)} bytes long but the line says {length}")
    if not value:
        raise ValueError(f"{where}: empty token")
    if idx <= 0:
        raise ValueError(f"{where}: id {idx} is invalid (0 is reserved for end of text)")
    return idx, value


class _ByteTrie:
    """Greedy longest match over bytes with a trie of dicts (the fallback encoder, without rwkvkit)."""

    def __init__(self, bytes_to_id: dict[bytes, int]) -> None:
        self._root: dict = {}
        for token, tid in bytes_to_id.items():
            node = self._root
            for byte in token:
                node = node.setdefault(byte, {})
            node[None] = tid  # key None: the id of the token that ends at this node

    def encode_bytes(self, data: bytes) -> list[int]:
        ids: list[int] = []
        pos, n = 0, len(data)
        while pos < n:
            node, best_id, best_end = self._root, None, pos
            for end in range(pos, n):
                node = node.get(data[end])
                if node is None:
                    break
                if None in node:
                    best_id, best_end = node[None], end + 1
            if best_id is None:
                raise ValueError(
                    f"byte 0x{data[pos]:02x} has no token in this vocab, so it cannot be encoded"
                )
            ids.append(best_id)
            pos = best_end
        return ids


def _rwkvkit_world_tokenizer_class() -> type | None:
    """rwkvkit's ``WorldTokenizer`` class (fast encoder), or None where rwkvkit is not importable."""
    try:
        return importlib.import_module("rwkvkit.tokenizer.world").WorldTokenizer
    except ImportError:
        return None


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text has the lone surrogate U+{ord(text[exc.start]):04X} at index {exc.start}, "
            "which has no UTF-8 encoding"
        ) from None


class RwkvWorldTokenizer(PreTrainedTokenizer):
    """The RWKV World tokenizer: ids 1..65529 from the vocab file, 0 = ``<|endoftext|>``, 65536 ids in all.

    ``vocab_file``: a World-format vocab file (rwkv_vocab_v20230424.txt). ``vocab_size`` is the largest id
    + 1 rounded up to a multiple of 64 (65536); ids below it without a token decode to "".
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = EOT_TOKEN,
        eos_token: str = EOT_TOKEN,
        pad_token: str = EOT_TOKEN,
        model_max_length: int = MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_file = str(vocab_file)
        id_to_bytes = parse_world_vocab(self.vocab_file)
        self._vocab_size = -(-(max(id_to_bytes) + 1) // 64) * 64
        # id -> token str (latin-1: one char per byte); "" for end of text and unused ids
        self._id_to_token = [""] * self._vocab_size
        for tid, token in id_to_bytes.items():
            self._id_to_token[tid] = token.decode("latin-1")
        self._token_to_id = {self._id_to_token[tid]: tid for tid in id_to_bytes}
        self._token_to_id[EOT_TOKEN] = 0
        self._bytes_to_id = {token: tid for tid, token in id_to_bytes.items()}
        self._encoder = None  # built on the first encode (see _get_encoder)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            model_max_length=model_max_length,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            split_special_tokens=split_special_tokens,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return max(self._vocab_size, len(self.get_vocab()))

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._token_to_id)
        vocab.update(getattr(self, "_added_tokens_encoder", {}))
        return vocab

    # ---- encoding ----
    def _get_encoder(self):
        """rwkvkit's WorldTokenizer where rwkvkit is importable (fast), else this module's byte trie."""
        if self._encoder is None:
            world_tokenizer = _rwkvkit_world_tokenizer_class()
            if world_tokenizer is not None:
                self._encoder = world_tokenizer(self.vocab_file)
            else:
                self._encoder = _ByteTrie(self._bytes_to_id)
        return self._encoder

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        id_to_token = self._id_to_token
        return [id_to_token[tid] for tid in self._get_encoder().encode_bytes(_utf8(text))]

    def _convert_token_to_id(self, token: str) -> int:
        try:
            return self._token_to_id[token]
        except KeyError:
            raise ValueError(f"{token!r} is not a token of the RWKV World vocab") from None

    # ---- decoding ----
    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self._vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary (0..{self._vocab_size - 1})")
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        added = getattr(self, "_added_tokens_encoder", {})
        pieces = []
        for token in tokens:
            if token == EOT_TOKEN:
                continue  # end of text decodes to nothing
            if token in added:
                pieces.append(token.encode("utf-8"))  # a token added by the user: its own text
            else:
                pieces.append(token.encode("latin-1"))
        return b"".join(pieces).decode("utf-8", errors="replace")

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """The text of the ids: their bytes joined, as one UTF-8 string (nothing inserted between tokens)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(token_ids, skip_special_tokens))
        if clean_up_tokenization_spaces:  # only when asked for explicitly: it changes the text
            text = self.clean_up_tokenization(text)
        return text

    # ---- saving ----
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs a directory, got {save_directory}")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        target = os.path.join(save_directory, prefix + VOCAB_FILE_NAME)
        if not (os.path.exists(target) and os.path.samefile(target, self.vocab_file)):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


# save_pretrained of any instance (also one made directly, not through AutoTokenizer) copies this module
# into the folder and writes the auto_map that points AutoTokenizer at it.
RwkvWorldTokenizer.register_for_auto_class("AutoTokenizer")
