"""The RWKV "World" tokenizer (rwkv_vocab_v20230424): vocab parsing, greedy longest-match encoding, decoding.

This module owns:

* parsing a World vocab file (lines ``<id> <python str or bytes literal> <byte length>``) safely, with
  ``ast.literal_eval`` (never ``eval``) and a check of every length field;
* ``WorldTokenizer``: encoding text as the greedy longest match over its UTF-8 bytes, byte-exact with the
  reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, and decoding ids back to bytes / text.

Two encoders
------------
The default backend ("aho-corasick") uses the Rust-backed ``ahocorasick-rs`` package, a core dependency:
the UTF-8 bytes of the text become a str with one character per byte (``.decode("latin-1")``), and so do
the tokens; one ``find_matches_as_strings`` call with leftmost-longest, non-overlapping semantics returns
every token, and a dict maps each to its id. Leftmost-longest matching takes the longest token starting at
the first position where one matches; when every single byte is a token, a token matches at every
position, so this is exactly the greedy longest match of the reference, for any vocab (with or without
partial-UTF-8 tokens) and any bytes. The automaton (~0.1 s, ~11 MB) is built on the first encode. It needs
all 256 single bytes in the vocab; otherwise, or where the package cannot be imported, the pure-Python
backend ("python", below) is used, which is also kept as the slow reference beside the fast path.

How encoding is made fast in pure Python
----------------------------------------
The reference walks a byte trie in Python, one step per byte. Here:

1. The trie of every token that is valid UTF-8 is turned into one regular expression over *characters*,
   which ``re`` runs in C; ``findall`` returns one string per token. A trie node becomes
   ``(?:child1...|child2...|)``, where the final empty alternative exists only when the node is itself a
   token, so the engine's backtracking yields exactly the longest token that prefixes the text. Children
   that end a token and have no children of their own are merged into one character class (the ~10k CJK
   characters, which never start a longer token, cost one set lookup), frequent children come first, and
   the other children of wide nodes sit behind a few lookahead guards such as ``(?=[a-m])``.
2. The only tokens that are not valid UTF-8 (single bytes >= 0x80, a lead byte with too few continuation
   bytes, 2-3 continuation bytes) always lie inside one character of valid text. So where no valid
   token matches, a final ``.`` alternative takes one character, which is tokenized on its own bytes by
   the plain byte-level greedy rule (cached per character): the result is the same as the byte-level
   walk over the whole text. The builder checks this property of the vocab and, for a vocab without it, uses
   the plain byte-level walk for everything.
3. No token contains a space after a character other than a space, tab or newline, nor a newline
   followed by anything but whitespace (the builder derives these sets from the vocab). No token can
   cross such a "hard" boundary, so the text is cut there into pieces (" the", " king,\\n") whose tokens
   do not depend on their neighbours. The ids of short pieces are cached (bounded), and the new pieces of
   a text are encoded together: joined by a control character that is a token of its own and part of no
   other token (NUL for the World vocab), run through the regex once, and cut apart at its id.

The vocab file is parsed lazily, on the first ``WorldTokenizer()`` for a path (~0.1 s), and cached per
path. Building the regexes takes ~1.5 s, so it waits until ~50k characters have been encoded; before
that (a chat prompt, a few short documents) encoding uses the byte-level walk, which is ready at once.
Both give the same ids.
"""

from __future__ import annotations

import ast
import os
import re
import threading
from collections.abc import Iterable
from itertools import chain, compress, count, filterfalse, repeat
from operator import add
from pathlib import Path
from types import ModuleType

from rwkvkit.errors import RwkvkitError

DEFAULT_VOCAB_PATH = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
EOT_ID = 0

# Characters tried first, in this order, among the ASCII children of the trie root; elsewhere children with
# the most tokens below come first. Roughly the frequency of the first character of a token in English.
_TOP_CHARS = " \n,.etaoinsrhldcumfpgwyTAISCMB'\"-:;!?()0123456789"
_TOP_RANK = {c: r for r, c in enumerate(_TOP_CHARS)}
_ROOT_FIRST = 8  # this many of them come before everything else at the root
# Root children in these ranges (CJK symbols and punctuation, kana, fullwidth forms) get their own guard
# right after ASCII, as they are frequent in Chinese and Japanese text.
_HOT_CLASS = "[\u3000-\u30ff\uff00-\uffef]"
# Characters that need a backslash in a pattern or a character class (the set ``re.escape`` escapes).
_SPECIAL = {c: "\\" + c for c in "()[]{}?*+-|^$\\.&~# \t\n\r\v\f"}
_GROUP = 12  # children tried one by one; wider nodes use lookahead guards
_FIRST = 8  # in a wider node, this many children (those with most tokens below) are tried first
_PIECE_CACHE_ENTRIES = 200_000  # the piece cache is emptied rather than grow past this many entries
_PIECE_CACHE_MAX_CHARS = 64  # longer pieces are encoded but not cached
_CHUNK_PIECES = 8192  # text with new pieces is encoded this many pieces at a time
_REGEX_AFTER_CHARS = 50_000  # until this many characters were encoded, use the byte walk (no build time)

_CONT_LOW, _CONT_HIGH = 0x80, 0xBF  # UTF-8 continuation bytes

BACKENDS = ("auto", "aho-corasick", "python")  # WorldTokenizer(backend=...); "auto" prefers aho-corasick


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


def parse_vocab_file(path: str | os.PathLike[str]) -> dict[int, bytes]:
    """Parse a World vocab file into ``{id: token bytes}`` (id 0, end of text, is not in the file).

    Raises RwkvkitError naming the file and line for a malformed line, a length field that does not match
    the token's byte length, an empty token, an id below 1, or a repeated id or token.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RwkvkitError(f"cannot read the vocab file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RwkvkitError(f"vocab file {path} is not valid UTF-8 ({exc})") from None

    id_to_bytes: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
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
# Byte-level greedy walk (exact for any input and any vocab; slow)
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

    Used for bytes that are not valid UTF-8, for the few characters the fast path hands back, and as the
    whole encoder for a vocab whose invalid-UTF-8 tokens could span characters.
    """

    def __init__(self, bytes_to_id: dict[bytes, int]) -> None:
        self._bytes_to_id = bytes_to_id
        prefixes: set[bytes] = set()
        for token in bytes_to_id:
            for end in range(1, len(token)):
                prefixes.add(token[:end])
        self._prefixes = prefixes  # proper prefixes of tokens: the inner nodes of the byte trie

    def encode(self, data: bytes) -> list[int]:
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
# Building the regex of the character trie
# --------------------------------------------------------------------------------------------------


def _is_cont(byte: int) -> bool:
    return _CONT_LOW <= byte <= _CONT_HIGH


def _lies_within_one_char(token: bytes) -> bool:
    """True if every occurrence of this invalid-UTF-8 token inside valid UTF-8 text stays in one character.

    That holds for 1-3 continuation bytes, and for one non-ASCII lead byte followed only by continuation
    bytes (a run longer than the lead allows can never occur in valid text, so it is harmless too).
    """
    if all(_is_cont(b) for b in token):
        return len(token) <= 3
    return token[0] >= 0xC0 and all(_is_cont(b) for b in token[1:])


def _escape(c: str) -> str:
    return _SPECIAL.get(c, c)


def _char_class(chars: Iterable[str]) -> str:
    """A character class for these characters, with runs of consecutive code points written as ranges."""
    codes = sorted({ord(c) for c in chars})
    if len(codes) == 1:
        return _escape(chr(codes[0]))
    parts: list[str] = []
    i = 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{_escape(chr(codes[i]))}-{_escape(chr(codes[j]))}")
        else:
            parts.extend(_escape(chr(code)) for code in codes[i : j + 1])
        i = j + 1
    return "[" + "".join(parts) + "]"


class _TrieNode:
    __slots__ = ("children", "is_token")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.is_token = False


# One child of a trie node in the regex: (its character, the pattern for what may follow it, tokens below).
_Child = tuple[str, str, int]


def _children(node: _TrieNode) -> tuple[list[str], list[_Child], int]:
    """Split a node's children into leaf-token characters and inner children; count tokens at or below."""
    leaves: list[str] = []
    inner: list[_Child] = []
    total = 1 if node.is_token else 0
    for c, child in node.children.items():
        if child.is_token and not child.children:
            leaves.append(c)
            total += 1
        else:
            child_alts, count = _node_alternatives(child)
            inner.append((c, _group(child_alts), count))
            total += count
    return leaves, inner, total


def _leaf_classes(leaves: list[str]) -> list[str]:
    bmp = [c for c in leaves if c <= "\uffff"]
    astral = [c for c in leaves if c > "\uffff"]  # kept apart: re has a fast set only for the BMP
    return [_char_class(group) for group in (bmp, astral) if group]


def _node_alternatives(node: _TrieNode) -> tuple[list[str], int]:
    """Return (regex alternatives for what may follow this node, number of tokens at or below it).

    Joined with "|", the alternatives match the rest of the longest token along the text. The last one
    is "" (stop here) exactly when the node is itself a token. A leaf has no alternatives.
    """
    leaves, inner, total = _children(node)
    alts = _leaf_classes(leaves)
    if len(inner) <= _GROUP:
        alts.extend(_plain(inner))
    else:
        # The children with most tokens below are tried first; the rest behind lookahead guards.
        inner.sort(key=lambda x: -x[2])
        alts.extend(_plain(inner[:_FIRST], keep_order=True))
        alts.extend(_guarded(sorted(inner[_FIRST:])))
    if node.is_token and alts:
        alts.append("")  # nothing longer matched: stop here, this node is a token
    return alts, total


def _root_alternatives(root: _TrieNode) -> list[str]:
    """Alternatives for the first character of a token; the caller adds the "any character" fallback.

    Order: the few most frequent ASCII starts, then the set of one-character tokens (CJK ideographs...),
    then the other ASCII starts, CJK punctuation and kana, the rest, and rare astral one-character tokens.
    """
    leaves, inner, _ = _children(root)
    bmp_leaves = [c for c in leaves if c <= "\uffff"]
    astral_leaves = [c for c in leaves if c > "\uffff"]  # kept apart: re has a fast set only for the BMP
    hot = re.compile(_HOT_CLASS)
    top = sorted((x for x in inner if x[0] in _TOP_RANK), key=lambda x: _TOP_RANK[x[0]])
    ascii_rest = sorted(x for x in inner if x[0] < "\x80" and x[0] not in _TOP_RANK)
    hot_chars = sorted(x for x in inner if hot.match(x[0]))
    others = sorted(x for x in inner if x[0] >= "\x80" and not hot.match(x[0]))

    alts = _plain(top[:_ROOT_FIRST], keep_order=True)
    if bmp_leaves:
        alts.append(_char_class(bmp_leaves))
    ascii_alts = [*_plain(top[_ROOT_FIRST:], keep_order=True), *_guarded(ascii_rest)]
    if ascii_alts:
        alts.append("(?=[\\x00-\\x7f])(?:" + "|".join(ascii_alts) + ")")
    if hot_chars:
        alts.append("(?=" + _HOT_CLASS + ")(?:" + "|".join(_guarded(hot_chars)) + ")")
    alts.extend(_guarded(others))
    if astral_leaves:
        alts.append(_char_class(astral_leaves))
    return alts


def _group(alts: list[str]) -> str:
    if not alts:
        return ""
    if len(alts) == 1:
        return alts[0]
    return "(?:" + "|".join(alts) + ")"


def _plain(items: list[_Child], keep_order: bool = False) -> list[str]:
    """Alternatives tried one by one, by default those with the most tokens below first."""
    if not keep_order:
        items = sorted(items, key=lambda x: -x[2])
    return [_escape(c) + pat for c, pat, _ in items]


def _guarded(items: list[_Child]) -> list[str]:
    """Alternatives for children sorted by code point, behind a halving chain of lookahead guards."""
    if len(items) <= _GROUP:
        return _plain(items)
    mid = len(items) // 2
    left, right = items[:mid], items[mid:]
    guard = f"(?=[{_escape(left[0][0])}-{_escape(left[-1][0])}])"
    return [guard + "(?:" + "|".join(_guarded(left)) + ")", *_guarded(right)]


def _split_pattern(tokens: Iterable[str]) -> str:
    """A regex whose matches cut text only at hard boundaries, where no token can cross.

    Hard boundaries: before a space whose previous character never precedes a space inside a token, and
    after a newline whose next character never follows a newline inside a token. A piece may contain
    hard boundaries too (that costs cache hits, never exactness).
    """
    before_space: set[str] = set()
    after_newline: set[str] = set()
    for token in tokens:
        for i in range(1, len(token)):
            if token[i] == " ":
                before_space.add(token[i - 1])
            if token[i - 1] == "\n":
                after_newline.add(token[i])
    body = ".[^ \\n]*"
    steps: list[str] = []
    if before_space:
        # A space after one of these is soft; so is every space of the run if a space can precede one.
        spaces = " +" if " " in before_space else " "
        steps.append("(?<=" + _char_class(before_space) + ")" + spaces + "[^ \\n]*")
    if after_newline:
        # A run of newlines ends a piece unless the next character may follow a newline in a token.
        steps.append("\\n+(?:(?=" + _char_class(after_newline) + ")[^ \\n]*)?")
    else:
        steps.append("\\n+")
    return body + "(?:" + "|".join(steps) + ")*"


# --------------------------------------------------------------------------------------------------
# The fast encoder
# --------------------------------------------------------------------------------------------------


def _separator(tokens: Iterable[str]) -> str | None:
    """A control character that is a token of its own and part of no other token, or None.

    Pieces joined with it encode exactly as they would one by one (no token can cross it).
    """
    used = {c for token in tokens if len(token) > 1 for c in token}
    for code in (*range(0x00, 0x09), *range(0x0E, 0x20)):
        c = chr(code)
        if c in tokens and c not in used:
            return c
    return None


class _TokenIds(dict):  # type: ignore[type-arg]
    """``{token text: (id,)}``; a missing key is a character at which no valid token matches.

    Such a character gets the ids of the byte-level greedy walk over its own bytes, computed on first
    sight and kept (there are at most as many as distinct characters). Values are tuples so that both
    kinds flatten alike with ``chain.from_iterable``; text without such characters maps through the
    plain ``{token text: id}`` dict instead, which is faster.
    """

    def __init__(self, byte_greedy: _ByteGreedy) -> None:
        super().__init__()
        self._byte_greedy = byte_greedy

    def __missing__(self, ch: str) -> tuple[int, ...]:
        ids = self[ch] = tuple(self._byte_greedy.encode(_utf8(ch)))
        return ids


class _RegexEncoder:
    """Pieces cut at hard boundaries -> cached ids; new pieces go through the trie regex in one call."""

    def __init__(self, bytes_to_id: dict[bytes, int], byte_greedy: _ByteGreedy) -> None:
        self._byte_greedy = byte_greedy
        token_id: dict[str, int] = {}  # token text -> id
        token_ids = _TokenIds(byte_greedy)  # token text -> (id,), and fallback characters -> their ids
        root = _TrieNode()
        for token, tid in bytes_to_id.items():
            try:
                s = token.decode("utf-8")
            except UnicodeDecodeError:
                continue
            token_id[s] = tid
            token_ids[s] = (tid,)
            node = root
            for c in s:
                child = node.children.get(c)
                if child is None:
                    child = node.children[c] = _TrieNode()
                node = child
            node.is_token = True
        # The root is never a token; "any single character" is the last resort (see _TokenIds).
        token_pattern = "|".join([*_root_alternatives(root), "."])
        self._find_tokens = re.compile(token_pattern, re.DOTALL).findall
        self._find_pieces = re.compile(_split_pattern(token_id), re.DOTALL).findall
        self._token_id = token_id
        self._token_ids = token_ids
        self._sep = _separator(token_id)
        self._sep_id = -1 if self._sep is None else token_id[self._sep]
        self._cache: dict[str, list[int]] = {}  # piece -> ids; emptied past _PIECE_CACHE_ENTRIES

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, text: str) -> list[int]:
        pieces = self._find_pieces(text)
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, pieces)))
        except KeyError:
            pass
        if self._sep is None or self._sep in text:  # pieces cannot be joined: encode the text in one go
            return self._ids(text)
        # In chunks, so that a long text reuses the pieces its own beginning taught the cache.
        ids: list[int] = []
        for start in range(0, len(pieces), _CHUNK_PIECES):
            ids += self._encode_chunk(pieces[start : start + _CHUNK_PIECES])
        return ids

    def _encode_chunk(self, pieces: list[str]) -> list[int]:
        """The ids of these pieces: new ones are encoded once each, in one regex call, and cached."""
        cache = self._cache
        new = list(set(filterfalse(cache.__contains__, pieces)))
        if sum(map(len, new)) > _PIECE_CACHE_MAX_CHARS * len(new):
            # Mostly long new pieces (CJK text has no spaces), which are not cached anyway: encode the
            # chunk in one go (pieces end at hard boundaries, so their concatenation encodes the same).
            return self._ids("".join(pieces))
        if new:
            if len(cache) > _PIECE_CACHE_ENTRIES:
                cache.clear()
            cache.update(zip(new, self._encode_joined(new), strict=True))
        try:
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:  # another thread emptied the cache meanwhile
            return list(chain.from_iterable(self._encode_joined(pieces)))
        finally:
            for piece in new:
                if len(piece) > _PIECE_CACHE_MAX_CHARS:  # long pieces are not kept (memory)
                    cache.pop(piece, None)

    def _encode_joined(self, pieces: list[str]) -> list[list[int]]:
        """The ids of each piece, from one regex call over the pieces joined by the separator.

        The separator is a token that no other token contains, so joining changes no piece's tokens and
        its id cuts the result apart (positions and slices are computed in C).
        """
        ids = self._ids(self._sep.join(pieces))  # type: ignore[union-attr]
        ends = list(compress(count(), map(self._sep_id.__eq__, ids)))
        if len(ends) != len(pieces) - 1:  # pragma: no cover - guaranteed by _separator
            raise AssertionError("separator split mismatch")
        starts = [0, *map(add, ends, repeat(1))]
        ends.append(len(ids))
        return list(map(ids.__getitem__, map(slice, starts, ends)))

    def _ids(self, text: str) -> list[int]:
        """The ids of text, from the strings the trie regex finds in it."""
        found = self._find_tokens(text)
        try:
            return list(map(self._token_id.__getitem__, found))
        except KeyError:  # stops at the first character where no token matches (an emoji, say)
            pass
        # Such a character has several ids: flatten tuples (a little slower, see _TokenIds).
        return list(chain.from_iterable(map(self._token_ids.__getitem__, found)))


# --------------------------------------------------------------------------------------------------
# The Aho-Corasick encoder (Rust, via ahocorasick-rs)
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


# --------------------------------------------------------------------------------------------------
# Parsed vocab, shared per path
# --------------------------------------------------------------------------------------------------


def _is_valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
        self._regex_encoder: _RegexEncoder | None = None
        self._regex_checked = False
        self._ac_encoder: _AhoCorasickEncoder | None = None
        self._ac_checked = False
        self._plain_chars = 0  # characters encoded by the byte walk while the regex is not built yet

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
        with self._lock:
            if self._byte_greedy is None:
                self._byte_greedy = _ByteGreedy(self.bytes_to_id)
            return self._byte_greedy

    def regex_encoder(self) -> _RegexEncoder | None:
        """The fast encoder, or None for a vocab where it would not be exact (see the module doc)."""
        if not self._regex_checked:
            with self._lock:
                if not self._regex_checked:
                    invalid = [t for t in self.bytes_to_id if not _is_valid_utf8(t)]
                    if all(_lies_within_one_char(t) for t in invalid):
                        self._regex_encoder = _RegexEncoder(self.bytes_to_id, self.byte_greedy())
                    self._regex_checked = True
        return self._regex_encoder

    def ac_encoder(self) -> _AhoCorasickEncoder | None:
        """The Aho-Corasick encoder, built on first use; None without ahocorasick-rs or all 256 bytes."""
        if not self._ac_checked:
            with self._lock:
                if not self._ac_checked:
                    module = _import_ahocorasick()
                    if module is not None and all(bytes([b]) in self.bytes_to_id for b in range(256)):
                        self._ac_encoder = _AhoCorasickEncoder(self.bytes_to_id, module)
                    self._ac_checked = True
        return self._ac_encoder

    def clear_cache(self) -> None:
        if self._regex_encoder is not None:
            self._regex_encoder.clear_cache()

    def encode(self, text: str, backend: str = "auto") -> list[int]:
        """Ids of text with this backend ("auto" falls back to "python" when aho-corasick is unavailable)."""
        if backend != "python":
            encoder = self.ac_encoder()
            if encoder is not None:
                return encoder.encode_bytes(_utf8(text))
            if backend == "aho-corasick":
                raise RwkvkitError(self._no_ac_reason())
        return self.encode_python(text)

    def encode_bytes(self, data: bytes, backend: str = "auto") -> list[int]:
        """Ids of raw bytes (not necessarily valid UTF-8) with this backend."""
        if backend != "python":
            encoder = self.ac_encoder()
            if encoder is not None:
                return encoder.encode_bytes(data)
            if backend == "aho-corasick":
                raise RwkvkitError(self._no_ac_reason())
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.byte_greedy().encode(data)
        return self.encode_python(text)

    def _no_ac_reason(self) -> str:
        if _import_ahocorasick() is None:
            return "the aho-corasick backend needs the ahocorasick-rs package (pip install ahocorasick-rs)"
        return f"the aho-corasick backend needs every single byte to be a token, which {self.path} lacks"

    def encode_python(self, text: str) -> list[int]:
        """Pure Python: the byte walk for the first _REGEX_AFTER_CHARS characters, then the trie regex."""
        if not self._regex_checked:
            with self._lock:
                plain = self._plain_chars + len(text) <= _REGEX_AFTER_CHARS
                if plain:
                    self._plain_chars += len(text)
            if plain:
                return self.byte_greedy().encode(_utf8(text))
        encoder = self.regex_encoder()
        if encoder is None:
            return self.byte_greedy().encode(_utf8(text))
        return encoder.encode(text)


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


def as_id_list(ids: Iterable[int]) -> list[int]:
    """A list of ids from a list/tuple, a torch tensor or numpy array (via ``tolist``), or any iterable."""
    if isinstance(ids, list):
        return ids
    tolist = getattr(ids, "tolist", None)
    if tolist is not None:
        out = tolist()
        return out if isinstance(out, list) else [out]
    return list(ids)


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
    available and "python" otherwise; asking for "aho-corasick" where it is unavailable raises on encode.
    Both give the same ids.
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
        return self._vocab.encode(text, self.backend)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes, which need not be valid UTF-8 (same greedy rule as ``encode``)."""
        return self._vocab.encode_bytes(bytes(data), self.backend)

    def clear_cache(self) -> None:
        """Forget the cached encodings of text pieces (shared by all tokenizers of this vocab file)."""
        self._vocab.clear_cache()

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
