"""Tests of rwkvkit.tokenizer: parity with the reference `rwkv` package, decoding, streaming, vocab files."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

import rwkvkit.tokenizer.world as world_module
from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer import ByteTokenizer, IncrementalDecoder, WorldTokenizer, load_tokenizer
from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH, parse_vocab_file

REF_VOCAB = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "train.txt"


@pytest.fixture(scope="module")
def ref() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(REF_VOCAB))


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    tokenizer = WorldTokenizer()  # backend "auto": aho-corasick, as ahocorasick-rs is installed
    assert tokenizer._vocab.ac_encoder() is not None, "the aho-corasick fast path is not active"
    return tokenizer


@pytest.fixture(scope="module")
def py_tok() -> WorldTokenizer:
    return WorldTokenizer(backend="python")  # the pure-Python reference the fast path is tested against


@pytest.fixture(scope="module", params=["aho-corasick", "python"])
def any_tok(request: pytest.FixtureRequest, tok: WorldTokenizer, py_tok: WorldTokenizer) -> WorldTokenizer:
    """Each backend in turn, for the tests of parity with the reference."""
    return tok if request.param == "aho-corasick" else py_tok


def ref_encode_bytes(ref: TRIE_TOKENIZER, data: bytes) -> list[int]:
    return ref.encodeBytes(data) if data else []


def assert_same(tok: WorldTokenizer, ref: TRIE_TOKENIZER, text: str) -> None:
    expected = ref.encode(text) if text else []
    got = tok.encode(text)
    assert got == expected, f"mismatch for {text[:80]!r}"


# ------------------------------------------------------------------------------------------------
# Parity with the reference TRIE_TOKENIZER
# ------------------------------------------------------------------------------------------------

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?\nYes!",
    "chinese": "我们今天去公园散步。人工智能正在改变世界，机器学习模型越来越大。「你好」（测试）",
    "japanese": "東京は日本の首都です。こんにちは世界！カタカナとひらがな、漢字。ｶﾀｶﾅ",
    "korean": "안녕하세요, 세계! 한국어 문장입니다.",
    "emoji": "😀🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈 ok 🙂🙃 ❤️ ✨🚀🧪🫠🪿",
    "code": 'def f(x):\n    """Doc."""\n    return {"a": [1, 2.5e-3]} if x else None\n\n\tint main() {}\n',
    "whitespace": " " * 300 + "\n" * 100 + "\t" * 40 + "x" + " \n" * 50 + "\r\n" * 20 + " \t \n  \n\n   \t",
    "spaces_before_words": "a" + " " * 7 + "b" + " " * 129 + "c\n\n\n    d\n \n e\t f  ",
    "mixed": "Hello 世界! Привет мир. Καλημέρα. مرحبا. नमस्ते. 😀 x² ≤ ∑ €100 — “quoted” … end",
    "control": "\x00\x01\x1f\x7f\u0085\u00a0\u2028\u2029\ufeff\ufffd",
    "rare": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀𓁐 𠀀𠜎 \U0010ffff \U000e0001 ꙮ",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encode_matches_reference(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER, name: str) -> None:
    assert_same(any_tok, ref, SAMPLES[name])
    assert_same(any_tok, ref, SAMPLES[name] * 3)  # a repeat must not change the longest matches


def test_encode_matches_reference_on_shakespeare(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    assert_same(any_tok, ref, text)
    assert_same(any_tok, ref, text[1000:30_000])


def test_empty_text(any_tok: WorldTokenizer) -> None:
    assert any_tok.encode("") == []
    assert any_tok.encode_bytes(b"") == []
    assert any_tok.decode([]) == ""


def _random_text(rng: random.Random) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x7F),
        (0x80, 0x24F),
        (0x370, 0x52F),
        (0x3000, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1FAFF),
        (0x0, 0x10FFFF),
    ]
    parts = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.15:
            parts.append(rng.choice([" ", "\n", "\t", "\r\n", "  "]) * rng.randint(1, 40))
        elif kind < 0.3:
            parts.append(
                rng.choice(["the", " the", " and", "ing", "tion", "。", "的", "です", "ー", "\u200d"])
            )
        else:
            lo, hi = rng.choice(ranges)
            for _ in range(rng.randint(1, 8)):
                code = rng.randint(lo, hi)
                if 0xD800 <= code <= 0xDFFF:  # lone surrogates have no UTF-8 encoding
                    code = 0xFFFD
                parts.append(chr(code))
    return "".join(parts)


def test_random_unicode_matches_reference(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    rng = random.Random(1234)
    texts = [_random_text(rng) for _ in range(3000)]
    for text in texts:
        assert_same(any_tok, ref, text)
    assert_same(any_tok, ref, "".join(texts))  # and all of them as one long text


def test_random_bytes_decoded_with_replace_match_reference(
    any_tok: WorldTokenizer, ref: TRIE_TOKENIZER
) -> None:
    rng = random.Random(99)
    for _ in range(1500):
        text = rng.randbytes(rng.randint(0, 60)).decode("utf-8", errors="replace")
        assert_same(any_tok, ref, text)


def test_random_raw_bytes_match_reference(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    rng = random.Random(7)
    for _ in range(800):
        data = rng.randbytes(rng.randint(0, 60))
        assert any_tok.encode_bytes(data) == ref_encode_bytes(ref, data)


def test_random_token_concatenations_match_reference(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    # Gluing real tokens together stresses the longest-match edge cases (a token followed by the
    # start of a longer one, partial UTF-8 tokens next to each other, ...).
    rng = random.Random(5)
    for _ in range(1500):
        ids = [rng.randint(1, 65529) for _ in range(rng.randint(1, 10))]
        data = ref.decodeBytes(ids)
        assert any_tok.encode_bytes(data) == ref_encode_bytes(ref, data)
        text = data.decode("utf-8", errors="replace")
        assert_same(any_tok, ref, text)


def test_text_containing_the_batch_separator(any_tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    # NUL is a token of its own next to longer tokens on both sides.
    text = "".join(f"w{i}\x00 x{i * 7} 你{i}" for i in range(300))
    assert_same(any_tok, ref, text)


# ------------------------------------------------------------------------------------------------
# The two backends: aho-corasick (Rust, default) vs the pure-Python reference
# ------------------------------------------------------------------------------------------------


def _backend_inputs() -> list[str]:
    rng = random.Random(4321)
    texts = [SAMPLES[name] for name in sorted(SAMPLES)]
    texts.append(SHAKESPEARE.read_text(encoding="utf-8")[:80_000])
    texts += [_random_text(rng) for _ in range(2000)]
    texts += [rng.randbytes(rng.randint(0, 80)).decode("utf-8", errors="replace") for _ in range(1000)]
    texts.append("".join(texts[-3000:]))
    return texts


def test_backends_agree(tok: WorldTokenizer, py_tok: WorldTokenizer) -> None:
    assert tok._vocab is py_tok._vocab  # same vocab, two encoders
    for text in _backend_inputs():
        fast = tok.encode(text)
        slow = py_tok.encode(text)
        assert fast == slow, f"backends disagree on {text[:80]!r}"
    rng = random.Random(8)
    for _ in range(1000):
        data = rng.randbytes(rng.randint(0, 80))
        assert tok.encode_bytes(data) == py_tok.encode_bytes(data)
    for _ in range(1000):  # real tokens glued together, including partial-UTF-8 ones
        data = py_tok.decode_bytes([rng.randint(1, 65529) for _ in range(rng.randint(1, 12))])
        assert tok.encode_bytes(data) == py_tok.encode_bytes(data)


def test_backends_agree_on_long_runs(tok: WorldTokenizer, py_tok: WorldTokenizer) -> None:
    # Long repeats stress longest-match restarts (the automaton must not drop or merge matches).
    for text in ("a" * 5000, " " * 3001, "\n" * 777 + "x", "ab" * 999, "你好" * 1000, "😀" * 500):
        assert tok.encode(text) == py_tok.encode(text)


@pytest.mark.filterwarnings("ignore:ahocorasick-rs cannot be imported:RuntimeWarning")
def test_backend_option(tmp_path: Path, ref: TRIE_TOKENIZER, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RwkvkitError, match="unknown tokenizer backend 'rust'"):
        WorldTokenizer(backend="rust")
    assert "backend='python'" in repr(WorldTokenizer(backend="python"))
    # Without ahocorasick-rs, "auto" falls back to the pure-Python encoder and "aho-corasick" is an error.
    monkeypatch.setattr(world_module, "_import_ahocorasick", lambda: None)
    path = tmp_path / "copy_of_vocab.txt"
    path.write_bytes(REF_VOCAB.read_bytes())
    auto = WorldTokenizer(path)
    assert_same(auto, ref, SAMPLES["mixed"])
    assert auto._vocab.ac_encoder() is None
    with pytest.raises(RwkvkitError, match="needs the ahocorasick-rs package"):
        WorldTokenizer(path, backend="aho-corasick").encode("x")


def test_missing_ahocorasick_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world_module, "_import_ahocorasick", lambda: None)
    monkeypatch.setattr(world_module, "_warned_no_ahocorasick", False)
    path = tmp_path / "copy_of_vocab.txt"
    path.write_bytes(REF_VOCAB.read_bytes())
    with pytest.warns(RuntimeWarning, match="ahocorasick-rs cannot be imported") as caught:
        auto = WorldTokenizer(path)
        ids = auto.encode("hello world")
        assert auto.encode_bytes(b"hello world") == ids
    assert len(caught) == 1 and "\n" not in str(caught[0].message)  # one warning, one line
    assert ids == WorldTokenizer(path, backend="python").encode("hello world")
    with pytest.raises(RwkvkitError, match="needs the ahocorasick-rs package"):
        WorldTokenizer(path, backend="aho-corasick").encode("x")


def test_aho_corasick_needs_every_byte(tmp_path: Path) -> None:
    path = _write_vocab(tmp_path / "vocab.txt", ["a", "b", "ab"])
    assert WorldTokenizer(path).encode("abba") == [3, 2, 1]  # auto: the pure-Python walk
    with pytest.raises(RwkvkitError, match="every single byte"):
        WorldTokenizer(path, backend="aho-corasick").encode("abba")


def test_shipped_vocab_is_the_reference_file() -> None:
    assert DEFAULT_VOCAB_PATH.read_bytes() == REF_VOCAB.read_bytes()


def test_vocab_properties(tok: WorldTokenizer) -> None:
    assert tok.vocab_size == 65536
    assert tok.eot_id == 0
    assert [tok.token_bytes(i) for i in (1, 2, 256)] == [b"\x00", b"\x01", b"\xff"]  # id = byte + 1


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


def test_decode_bytes_matches_reference(tok: WorldTokenizer, ref: TRIE_TOKENIZER) -> None:
    rng = random.Random(11)
    for _ in range(300):
        ids = [rng.randint(1, 65529) for _ in range(rng.randint(0, 30))]
        assert tok.decode_bytes(ids) == ref.decodeBytes(ids)
        # Never crashes; partial UTF-8 becomes U+FFFD.
        assert tok.decode(ids) == ref.decodeBytes(ids).decode("utf-8", errors="replace")


def test_roundtrip(tok: WorldTokenizer) -> None:
    rng = random.Random(21)
    for _ in range(300):
        text = _random_text(rng)
        assert tok.decode(tok.encode(text)) == text


def test_decode_partial_utf8_token(tok: WorldTokenizer) -> None:
    partial = tok.encode_bytes(b"\xf0\x9f")
    assert len(partial) == 1  # one token that is half an emoji
    assert tok.decode_bytes(partial) == b"\xf0\x9f"
    assert tok.decode(partial) == "\ufffd"
    assert tok.decode([*partial, tok.encode_bytes(b"\x98")[0], tok.encode_bytes(b"\x80")[0]]) == "😀"


def test_eot_and_unused_ids_decode_to_nothing(tok: WorldTokenizer) -> None:
    assert tok.decode_bytes([0]) == b""
    assert tok.decode([0, *tok.encode("hi"), 0]) == "hi"
    assert tok.decode_bytes(range(65530, 65536)) == b""


@pytest.mark.parametrize("bad", [65536, 70000, -1, -65536])
def test_decode_out_of_range_raises(tok: WorldTokenizer, bad: int) -> None:
    with pytest.raises(RwkvkitError, match=rf"token id {bad}\b.*65536"):
        tok.decode([5, bad])
    with pytest.raises(RwkvkitError, match=str(bad)):
        tok.token_bytes(bad)


def test_decode_accepts_tensors_and_arrays(tok: WorldTokenizer) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor 你好")
    assert tok.decode(np.array(ids)) == "tensor 你好"
    assert tok.decode(torch.tensor(ids)) == "tensor 你好"
    assert tok.decode(tuple(ids)) == "tensor 你好"
    decoder = IncrementalDecoder(tok)  # 0-d tensors and numpy scalars, as a sampling loop produces them
    streamed = [decoder.feed(t) for t in torch.tensor(ids)] + [decoder.feed(i) for i in np.array(ids)]
    assert "".join(streamed) + decoder.flush() == "tensor 你好" * 2


def test_lone_surrogate_is_a_clear_error(any_tok: WorldTokenizer) -> None:
    with pytest.raises(RwkvkitError, match="surrogate U\\+D800"):
        any_tok.encode("ok \ud800")
    with pytest.raises(RwkvkitError, match="surrogate"):
        ByteTokenizer().encode("\udfff")


def test_encode_rejects_bytes(tok: WorldTokenizer) -> None:
    with pytest.raises(TypeError):
        tok.encode(b"abc")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Streaming decoder
# ------------------------------------------------------------------------------------------------


def _split_char_tokens(tok: WorldTokenizer) -> list[int]:
    """Ids of real vocab tokens that are not valid UTF-8 on their own."""
    out = []
    for i in range(1, 65530):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    return out


def test_vocab_has_tokens_that_split_characters(tok: WorldTokenizer) -> None:
    split = _split_char_tokens(tok)
    assert len(split) > 300
    assert tok.encode_bytes(b"\xf0\x9f")[0] in split


def test_streaming_never_breaks_a_character(tok: WorldTokenizer) -> None:
    text = "emoji 😀🫠🪿 and rare CJK 𠀀𠜎 and 한국어 and 𓀀 done"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    outputs = [decoder.feed(i) for i in ids]
    assert any(tok.token_bytes(i) and not _valid(tok.token_bytes(i)) for i in ids)  # some ids split chars
    assert "" in outputs  # something was held back
    assert all("\ufffd" not in out for out in outputs)
    assert "".join(outputs) + decoder.flush() == text == tok.decode(ids)


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_streaming_random_token_streams(tok: WorldTokenizer) -> None:
    rng = random.Random(17)
    split = _split_char_tokens(tok)
    for _ in range(300):
        ids = [
            rng.choice(split) if rng.random() < 0.5 else rng.randint(0, 65535)
            for _ in range(rng.randint(0, 40))
        ]
        decoder = IncrementalDecoder(tok)
        pieces = []
        i = 0
        while i < len(ids):  # feed one or several ids at a time
            step = rng.randint(1, 3)
            pieces.append(decoder.feed(ids[i : i + step]))
            i += step
        assert "".join(pieces) + decoder.flush() == tok.decode(ids)


def test_streaming_holds_only_what_can_still_complete(tok: WorldTokenizer) -> None:
    byte_id = {b: tok.encode_bytes(bytes([b]))[0] for b in (0x80, 0xE4, 0xF0, 0x9F, 0x98, 0x80, 0x61)}
    decoder = IncrementalDecoder(tok)
    assert decoder.feed(byte_id[0x80]) == "\ufffd"  # lone continuation byte: out at once
    assert decoder.feed(byte_id[0xE4]) == ""  # lead byte: held
    assert decoder.pending == b"\xe4"
    assert decoder.feed(byte_id[0x61]) == "\ufffda"  # lead followed by ASCII: replaced, not held
    assert decoder.feed([byte_id[0xF0], byte_id[0x9F], byte_id[0x98]]) == ""
    assert decoder.feed(byte_id[0x80]) == "😀"
    assert decoder.feed(byte_id[0xF0]) == ""
    assert decoder.flush() == "\ufffd"  # unfinished at the end
    assert decoder.feed(byte_id[0x61]) == "a"  # flush started afresh


def test_streaming_bad_id_raises_and_keeps_state(tok: WorldTokenizer) -> None:
    decoder = IncrementalDecoder(tok)
    assert decoder.feed(tok.encode_bytes(b"\xe4")) == ""
    with pytest.raises(RwkvkitError):
        decoder.feed([tok.encode_bytes(b"\xb8")[0], 65536])
    assert decoder.feed(tok.encode_bytes(b"\xb8\xad")) == "中"


def test_streaming_with_byte_tokenizer() -> None:
    bt = ByteTokenizer()
    text = "bytes: é 中 😀"
    decoder = IncrementalDecoder(bt)
    outputs = [decoder.feed(i) for i in bt.encode(text)]
    assert "".join(outputs) + decoder.flush() == text
    assert all("\ufffd" not in out for out in outputs)


# ------------------------------------------------------------------------------------------------
# Byte tokenizer
# ------------------------------------------------------------------------------------------------


def test_byte_tokenizer() -> None:
    bt = ByteTokenizer()
    assert bt.vocab_size == 256 and bt.eot_id == 0
    text = "héllo 世界 😀\x00"
    ids = bt.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert bt.decode(ids) == text
    assert bt.decode(ids[:-2]) == "héllo 世界 \ufffd"  # cut in the middle of the emoji
    assert bt.encode_bytes(b"\xff\x00") == [255, 0]
    assert bt.token_bytes(65) == b"A"
    for bad in (256, -1, 1000):
        with pytest.raises(RwkvkitError, match=rf"token id {bad}\b.*256"):
            bt.decode([1, bad])


# ------------------------------------------------------------------------------------------------
# Loading, vocab files
# ------------------------------------------------------------------------------------------------


def test_load_tokenizer(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("world"), WorldTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(str(REF_VOCAB)), WorldTokenizer)
    with pytest.raises(RwkvkitError, match="unknown tokenizer 'gpt9'"):
        load_tokenizer("gpt9")


def test_vocab_is_cached_per_path() -> None:
    a, b = WorldTokenizer(), WorldTokenizer(DEFAULT_VOCAB_PATH)
    assert a._vocab is b._vocab


def test_import_is_light() -> None:
    code = (
        "import rwkvkit.tokenizer as t, rwkvkit.tokenizer.world as w, sys\n"
        "assert not w._VOCABS, 'vocab read at import'\n"
        "assert 'rwkv' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _write_vocab(path: Path, tokens: list[bytes | str]) -> Path:
    lines = []
    for i, token in enumerate(tokens, start=1):
        length = len(token.encode("utf-8")) if isinstance(token, str) else len(token)
        lines.append(f"{i} {token!r} {length}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _small_vocab(extra: list[bytes | str]) -> list[bytes | str]:
    singles: list[bytes | str] = [bytes([b]) if b >= 0x80 else chr(b) for b in range(256)]
    return singles + extra


@pytest.mark.parametrize(
    "extra",
    [
        # "\x00a": a token that starts with NUL.
        [
            "ab",
            "abc",
            "abcd",
            " a",
            " ab",
            "bc",
            "中",
            "中文",
            "😀",
            b"\xf0\x9f",
            b"\x98\x80",
            "  ",
            "   ",
            "\x00a",
        ],
        # A token that crosses characters as partial UTF-8.
        ["ab", b"a\xe4", b"\xb8\xad\xe6", "中", " a"],
    ],
)
@pytest.mark.parametrize("backend", ["aho-corasick", "python"])
def test_custom_vocab_matches_reference(tmp_path: Path, extra: list[bytes | str], backend: str) -> None:
    path = _write_vocab(tmp_path / "vocab.txt", _small_vocab(extra))
    mine, theirs = WorldTokenizer(path, backend=backend), TRIE_TOKENIZER(str(path))
    assert mine.vocab_size == 320  # 256 + len(extra) rounded up to a multiple of 64
    # Text without NUL.
    assert mine.encode("ab abc abcd bc 中文 a") == theirs.encode("ab abc abcd bc 中文 a")
    rng = random.Random(2)
    alphabet = ["a", "b", "c", "d", " ", "中", "文", "😀", "é", "\n", "\x00"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert mine.encode(text) == (theirs.encode(text) if text else [])
        data = text.encode("utf-8")[1:]  # often starts inside a character
        assert mine.encode_bytes(data) == ref_encode_bytes(theirs, data)


def test_vocab_without_all_bytes_raises_on_unknown_byte(tmp_path: Path) -> None:
    path = _write_vocab(tmp_path / "vocab.txt", ["a", "b", "ab"])
    tok = WorldTokenizer(path)
    assert tok.encode("abba") == [3, 2, 1]
    with pytest.raises(RwkvkitError, match="0x7a"):
        tok.encode("z")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 'ab' 3", "2 bytes long but the line says 3"),
        ("1 __import__('os').system('echo pwned') 1", "cannot parse"),
        ("1 42 2", "expected a str or bytes literal"),
        ("x 'a' 1", "must be integers"),
        ("0 'a' 1", "reserved for end of text"),
        ("1 '' 0", "empty token"),
        ("1'a'1", "expected '<id> <literal> <byte length>'"),
    ],
)
def test_bad_vocab_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match=message):
        parse_vocab_file(path)


def test_vocab_duplicates_and_bytes_literals(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("1 'a' 1\n1 'b' 1\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="id 1 appears twice"):
        parse_vocab_file(path)
    path.write_text("1 'a' 1\n2 b'a' 1\n", encoding="utf-8")
    with pytest.raises(RwkvkitError, match="already has id 1"):
        parse_vocab_file(path)
    path.write_text("1 b'\\xe4\\xb8' 2\n2 '\\n' 1\n3 \"it's\" 4\n", encoding="utf-8")
    assert parse_vocab_file(path) == {1: b"\xe4\xb8", 2: b"\n", 3: b"it's"}


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(RwkvkitError, match="cannot read the vocab file"):
        WorldTokenizer(tmp_path / "nope.txt")
