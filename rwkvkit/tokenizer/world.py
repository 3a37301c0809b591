"""The RWKV "World" tokenizer (rwkv_vocab_v20230424): vocab parsing, greedy longest-match encoding, decoding.

This module owns:

* parsing a World vocab file (lines ``<id> <python str or bytes literal> <byte length>``) safely, with
  ``ast.literal_eval`` (never ``eval``) and a check of every length field;
* ``WorldTokenizer``: encoding text as the greedy longest match over its UTF-8 bytes, byte-exact with the
  reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, and decoding ids back to bytes / text.

Two encoders
------------
The fast path ("aho-corasick", the default) uses the Rust-backed ``ahocorasick-rs`` package, a core
dependency: the UTF-8 bytes of the text become a str with one character per byte (``.decode("latin-1")``),
and so do the tokens; one ``find_matches_as_strings`` call with leftmost-longest, non-overlapping semantics
returns every token, and a dict maps each to its id. Leftmost-longest matching takes the longest token
starting at the first position where one matches; when every single byte is a token, a token matches at
every position, so this is exactly the greedy longest match of the reference, for any vocab (with or
without partial-UTF-8 tokens) and any bytes. The automaton (~0.1 s, ~11 MB) is built on the first encode.

The reference ("python") is the greedy rule itself in plain Python, one step of a byte trie per byte: slow,
exact for any vocab and any bytes, and what the fast path is tested against. "auto" uses it where the fast
path cannot serve: for a vocab that lacks some single byte, and, with one warning, where ahocorasick-rs
cannot be imported (a broken install).

The vocab file is parsed lazily, on the first ``WorldTokenizer()`` for a path (~0.1 s), and cached per
path.
"""

from __future__ import annotations

import ast
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer.common import as_id_list, read_text_file

__all__ = ["BACKENDS", "DEFAULT_VOCAB_PATH", "EOT_ID", "WorldTokenizer", "as_id_list", "parse_vocab_file"]

DEFAULT_VOCAB_PATH = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
EOT_ID = 0

BACKENDS = ("auto", "aho-corasick", "python")  # WorldTokenizer(backend=...); "auto" prefers aho-corasick
_NO_AHOCORASICK = (
    "ahocorasick-rs cannot be imported: the World tokenizer falls back to its slow pure-Python encoder "
    "(same ids; pip install ahocorasick-rs)"
)
_warned_no_ahocorasick = False  # the warning above is given once per process


# --------------------------------------------------------------------------------------------------
# Vocab file parsing
# --------------------------------------------------------------------------------------------------


def _parse_literal(lit: str, where: str) -> bytes:
    """Return the bytes of one token literal (a Python str or bytes literal), without eval."""
    quote = lit[:1]
    if (
        len(lit) >= 2
        and quote in ("'", '"')
        and lit[-1] == quote
        and "\\" not in lit
        and "\r" not in lit
        and quote not in lit[1:-1]
    ):
        # Fast path: a quoted string with no backslash means exactly its inner text.
        value: object = lit[1:-1]
    else:
        try:
            value = ast.literal_eval(lit)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise RwkvkitError(f"{where}: cannot parse the token literal {lit[:60]!r} ({exc})") from None
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise RwkvkitError(f"{where}: token {lit[:60]!r} has no UTF-8 encoding") from None
    if isinstance(value, bytes):
        return value
    raise RwkvkitError(f"{where}: expected a str or bytes literal, got {type(value).__name__}")


def _parse_vocab_line(line: str, where: str) -> tuple[int, bytes]:
    """(id, token bytes) of one line ``<id> <literal> <byte length>``; RwkvkitError if it is malformed."""
    first = line.find(" ")
    last = line.rfind(" ")
    if first <= 0 or last <= first:
        raise RwkvkitError(f"{where}: expected '<id> <literal> <byte length>', got {line[:80]!r}")
    try:
        idx = int(line[:first])
        length = int(line[last + 1 :])
    except ValueError:
        raise RwkvkitError(f"{where}: the id and byte length must be integers: {line[:80]!r}") from None
    token = _parse_literal(line[first + 1 : last], where)
    if len(token) != length:
        raise RwkvkitError(f"{where}: the token is {len(token)} bytes long but the line says {length}")
    if not token:
        raise RwkvkitError(f"{where}: empty token")
    if idx <= 0:
        raise RwkvkitError(f"{where}: id {idx} is invalid (0 is reserved for end of text)")
    return idx, token


def parse_vocab_file(path: str | os.PathLike[str]) -> dict[int, bytes]:
    """Parse a World vocab file into ``{id: token bytes}`` (id 0, end of text, is not in the file).

    Raises RwkvkitError naming the file and line for a malformed line, a length field that does not match
    the token's byte length, an empty token, an id below 1, or a repeated id or token.
    """
    path = Path(path)
    text = read_text_file(path, "vocab file")
    id_to_bytes: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        idx, token = _parse_vocab_line(line, where)
        if idx in id_to_bytes:
            raise RwkvkitError(f"{where}: id {idx} appears twice")
        if token in seen:
            raise RwkvkitError(f"{where}: token {token!r} already has id {seen[token]}")
        id_to_bytes[idx] = token
        seen[token] = idx
    if not id_to_bytes:
        raise RwkvkitError(f"vocab file {path} has no tokens")
    return id_to_bytes


# --------------------------------------------------------------------------------------------------
# The reference: byte-level greedy walk (exact for any input and any vocab; slow)
# --------------------------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise RwkvkitError(
            f"text has the lone surrogate U+{code:04X} at index {exc.start}, which has no UTF-8 encoding"
        ) from None


class _ByteGreedy:
    """Greedy longest match over raw bytes, one trie step per byte (the reference rule, in plain Python).

    The "python" backend, and the reference the Aho-Corasick fast path is tested against.
    """

    def __init__(self, bytes_to_id: dict[bytes, int]) -> None:
        self._bytes_to_id = bytes_to_id
        prefixes: set[bytes] = set()
        for token in bytes_to_id:
            for end in range(1, len(token)):
                prefixes.add(token[:end])
        self._prefixes = prefixes  # proper prefixes of tokens: the inner nodes of the byte trie

    def encode_bytes(self, data: bytes) -> list[int]:
        get = self._bytes_to_id.get
        prefixes = self._prefixes
        out: list[int] = []
        pos, n = 0, len(data)
        while pos < n:
            best_id, best_end = -1, pos
            end = pos + 1
            while end <= n:
                piece = data[pos:end]
                tid = get(piece)
                if tid is not None:
                    best_id, best_end = tid, end
                if piece not in prefixes:
                    break
                end += 1
            if best_id < 0:
                raise RwkvkitError(
                    f"byte 0x{data[pos]:02x} has no token in this vocab, so it cannot be encoded"
                )
            out.append(best_id)
            pos = best_end
        return out


# --------------------------------------------------------------------------------------------------
# The fast path: Aho-Corasick (Rust, via ahocorasick-rs)
# --------------------------------------------------------------------------------------------------


class _AhoCorasickEncoder:
    """Greedy longest match as one leftmost-longest Aho-Corasick search over the text's bytes (as latin-1).

    Exact only for a vocab in which every single byte is a token (the caller checks that).
    """

    def __init__(self, bytes_to_id: dict[bytes, int], ahocorasick_rs: ModuleType) -> None:
        # latin-1 maps each byte to the character with the same code, so bytes <-> str is one-to-one.
        token_id = {token.decode("latin-1"): tid for token, tid in bytes_to_id.items()}
        automaton = ahocorasick_rs.AhoCorasick(
            list(token_id),
            matchkind=ahocorasick_rs.MATCHKIND_LEFTMOST_LONGEST,
            # Keep the token strs, so that matches come back as those very objects (fast dict lookups).
            store_patterns=True,
            implementation=ahocorasick_rs.Implementation.ContiguousNFA,
        )
        self._find = automaton.find_matches_as_strings
        self._token_id = token_id

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(map(self._token_id.__getitem__, self._find(data.decode("latin-1"))))


def _import_ahocorasick() -> ModuleType | None:
    """The ``ahocorasick_rs`` module, or None where it is not installed (or cannot load)."""
    try:
        import ahocorasick_rs
    except ImportError:
        return None
    return ahocorasick_rs


def _warn_no_ahocorasick() -> None:
    global _warned_no_ahocorasick
    if not _warned_no_ahocorasick:
        _warned_no_ahocorasick = True
        warnings.warn(_NO_AHOCORASICK, RuntimeWarning, stacklevel=4)  # at the caller of encode()


# --------------------------------------------------------------------------------------------------
# Parsed vocab, shared per path
# --------------------------------------------------------------------------------------------------


class _Vocab:
    """A parsed vocab file; one instance per path, shared by every WorldTokenizer built from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.id_to_bytes = parse_vocab_file(path)
        self.max_id = max(self.id_to_bytes)
        self.bytes_to_id = {token: tid for tid, token in self.id_to_bytes.items()}
        self._lock = threading.RLock()
        self._decode_tables: dict[int, dict[int, bytes]] = {}
        self._byte_greedy: _ByteGreedy | None = None
        self._ac_encoder: _AhoCorasickEncoder | None = None
        self._ac_checked = False
        self._ac_module_missing = False

    def decode_table(self, vocab_size: int) -> dict[int, bytes]:
        """``{id: bytes}`` for every id in [0, vocab_size): b"" for end of text and for unused ids."""
        with self._lock:
            table = self._decode_tables.get(vocab_size)
            if table is None:
                table = dict.fromkeys(range(vocab_size), b"")
                table.update(self.id_to_bytes)
                self._decode_tables[vocab_size] = table
            return table

    def byte_greedy(self) -> _ByteGreedy:
        """The reference encoder, built on first use."""
        with self._lock:
            if self._byte_greedy is None:
                self._byte_greedy = _ByteGreedy(self.bytes_to_id)
            return self._byte_greedy

    def ac_encoder(self) -> _AhoCorasickEncoder | None:
        """The Aho-Corasick encoder, built on first use; None without ahocorasick-rs or all 256 bytes."""
        if not self._ac_checked:
            with self._lock:
                if not self._ac_checked:
                    module = _import_ahocorasick()
                    self._ac_module_missing = module is None
                    if module is not None and all(bytes([b]) in self.bytes_to_id for b in range(256)):
                        self._ac_encoder = _AhoCorasickEncoder(self.bytes_to_id, module)
                    self._ac_checked = True
        return self._ac_encoder

    def encoder(self, backend: str) -> _AhoCorasickEncoder | _ByteGreedy:
        """The encoder of this backend; "auto" takes the fast path where it can (see the module doc)."""
        if backend == "python":
            return self.byte_greedy()
        encoder = self.ac_encoder()
        if encoder is not None:
            return encoder
        if backend == "aho-corasick":
            raise RwkvkitError(self._no_ac_reason())
        if self._ac_module_missing:
            _warn_no_ahocorasick()
        return self.byte_greedy()

    def _no_ac_reason(self) -> str:
        if self._ac_module_missing:
            return "the aho-corasick backend needs the ahocorasick-rs package (pip install ahocorasick-rs)"
        return f"the aho-corasick backend needs every single byte to be a token, which {self.path} lacks"


_VOCABS: dict[Path, _Vocab] = {}
_VOCABS_LOCK = threading.Lock()


def _load_vocab(path: str | os.PathLike[str] | None) -> _Vocab:
    resolved = DEFAULT_VOCAB_PATH if path is None else Path(path)
    try:
        resolved = resolved.resolve()
    except OSError:
        pass
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(resolved)
        if vocab is None:
            vocab = _VOCABS[resolved] = _Vocab(resolved)
        return vocab


# --------------------------------------------------------------------------------------------------
# Public tokenizer
# --------------------------------------------------------------------------------------------------


class WorldTokenizer:
    """The RWKV World tokenizer: 65536 ids, id 0 is end of text, ids 1..256 are the single bytes 0..255.

    ``WorldTokenizer()`` uses the vocab shipped with rwkvkit (rwkv_vocab_v20230424); pass ``path`` for
    another file in the same format. Parsed vocabs are cached per path, so a second instance is cheap.
    ``vocab_size`` defaults to the largest id + 1 rounded up to a multiple of 64 (65536 for the World
    vocab); ids below it that have no token (65530..65535) decode to nothing, like id 0.
    ``backend`` picks the encoder (see the module doc): "auto" (default) uses "aho-corasick" where it is
    available and "python" (the slow pure-Python reference) otherwise; asking for "aho-corasick" where it
    is unavailable raises on encode. Both give the same ids.
    """

    name = "world"
    eot_id = EOT_ID

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        vocab_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        if backend not in BACKENDS:
            raise RwkvkitError(
                f"unknown tokenizer backend {backend!r}: expected one of {', '.join(BACKENDS)}"
            )
        self.backend = backend
        self._vocab = _load_vocab(path)
        minimum = self._vocab.max_id + 1
        if vocab_size is None:
            vocab_size = -(-minimum // 64) * 64
        elif vocab_size < minimum:
            raise RwkvkitError(
                f"vocab_size {vocab_size} is too small for {self._vocab.path} (ids go up to {minimum - 1})"
            )
        self.vocab_size = vocab_size
        self._id_to_bytes = self._vocab.decode_table(vocab_size)

    @property
    def path(self) -> Path:
        """The vocab file this tokenizer was loaded from."""
        return self._vocab.path

    def __repr__(self) -> str:
        return (
            f"WorldTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, backend={self.backend!r})"
        )

    # ---- encoding ----
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: the greedy longest match over its UTF-8 bytes (never emits eot_id).

        RwkvkitError if the text holds a lone surrogate (it has no UTF-8 encoding).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__} (use encode_bytes for bytes)")
        return self._vocab.encoder(self.backend).encode_bytes(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes, which need not be valid UTF-8 (same greedy rule as ``encode``)."""
        return self._vocab.encoder(self.backend).encode_bytes(bytes(data))

    def clear_cache(self) -> None:
        """Does nothing: neither encoder caches encodings any more (kept so that callers keep working)."""

    # ---- decoding ----
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for end of text and for unused ids)."""
        try:
            return self._id_to_bytes[token_id]
        except (KeyError, TypeError):
            raise self._bad_id(token_id) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The tokens' bytes, concatenated; RwkvkitError for an id outside [0, vocab_size)."""
        ids = as_id_list(ids)
        try:
            return b"".join(map(self._id_to_bytes.__getitem__, ids))
        except (KeyError, TypeError):
            pass
        for token_id in ids:
            self.token_bytes(token_id)  # raises for the first bad id
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> str:
        """The tokens' text; bytes that are not valid UTF-8 (partial characters) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _bad_id(self, token_id: object) -> RwkvkitError:
        return RwkvkitError(
            f"token id {token_id!r} is outside the vocabulary: valid ids are 0..{self.vocab_size - 1} "
            f"(vocab_size={self.vocab_size})"
        )
