"""Tests of rwkvkit.tokenizer.hf: Hugging Face tokenizer.json files (GPT-NeoX style byte-level BPE).

The main fixture trains a small byte-level BPE with the ``tokenizers`` library itself, so every check is
against independent facts: the UTF-8 bytes of the text, the library's own encode / decode / vocab, and
the published GPT-2 byte table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

import rwkvkit.tokenizer.hf as hf_module
from rwkvkit.errors import RwkvkitError
from rwkvkit.tokenizer import HFTokenizer, IncrementalDecoder, Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "shakespeare" / "train.txt"

EOT = "<|endoftext|>"
SPACES_TOKEN = " " * 8  # an added token of plain spaces, like GPT-NeoX's ids 50254..50276

MULTILINGUAL = [
    "我们今天去公园散步。人工智能正在改变世界，机器学习模型越来越大。",
    "東京は日本の首都です。こんにちは世界！カタカナとひらがな、漢字。",
    "😀🎉👍🏽 emoji ❤️ ✨🚀 ok 🙂",
    "Привет мир. Καλημέρα. Hello 世界!",
]

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?\nYes!",
    "shakespeare": "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet.",
    "chinese": "人工智能正在改变世界。「你好」（测试）龘",
    "japanese": "こんにちは世界！東京タワーへ行きましょう。ｶﾀｶﾅ",
    "emoji": "😀🎉👍🏽👨‍👩‍👧‍👦🏳️‍🌈 ok 🙂🙃 ❤️ ✨🚀🧪🫠🪿",
    "code": 'def f(x):\n    """Doc."""\n    return {"a": [1, 2.5e-3]} if x else None\n\n\tint main() {}\n',
    "whitespace": " " * 37
    + "\n" * 5
    + "\t" * 4
    + "x"
    + " \n" * 5
    + "\r\n" * 3
    + " \t \n  \n\n   \t"
    + " " * 9,
    "mixed": "Hello 世界! Привет. مرحبا. नमस्ते. x² ≤ ∑ €100 — “quoted” … \x00\x7f end",
    "eot_inside": f"first document{EOT}second document",
}


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


def _train_byte_level_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        # <|padding|> first, so that the id of <|endoftext|> (1) is not the fallback eot_id 0
        special_tokens=["<|padding|>", EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    lines = text.splitlines(keepends=True) + MULTILINGUAL * 20
    tok.train_from_iterator(lines, trainer)
    tok.add_tokens([AddedToken(SPACES_TOKEN, normalized=True)])
    # A post-processor that appends <|endoftext|>: HFTokenizer.encode must not apply it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOT}", special_tokens=[(EOT, tok.token_to_id(EOT))]
    )
    return tok


@pytest.fixture(scope="module")
def lib_tok() -> tokenizers.Tokenizer:
    return _train_byte_level_bpe()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory, lib_tok: tokenizers.Tokenizer) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    lib_tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tok_path: Path) -> HFTokenizer:
    return HFTokenizer(tok_path)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# The GPT-2 byte <-> character table
# ------------------------------------------------------------------------------------------------


def test_byte_table_is_the_byte_level_alphabet() -> None:
    table = hf_module._BYTE_TO_CHAR
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # Published facts of the GPT-2 table: printable Latin-1 stands for itself, space and newline shift.
    assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a" and table[0] == "\u0100"
    assert table[0xAD] == "\u0143"  # the soft hyphen is the last of the 68 shifted bytes
    for b in (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)):
        assert table[b] == chr(b)


def test_byte_table_matches_library_pre_tokenizer() -> None:
    # Characters whose UTF-8 covers every byte that can occur in valid UTF-8.
    codes = [
        *range(0, 0x800),
        0x800,
        *range(0x1000, 0x10000, 0x1000),
        *range(0x10000, 0x110000, 0x40000),
        0x10FFFF,
    ]
    text = "".join(map(chr, codes))
    data = text.encode("utf-8")
    assert set(data) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    mapped = "".join(piece for piece, _ in pieces)
    assert mapped == "".join(hf_module._BYTE_TO_CHAR[b] for b in data)


# ------------------------------------------------------------------------------------------------
# Encoding and decoding
# ------------------------------------------------------------------------------------------------


def test_vocab_size_eot_and_name(tok: HFTokenizer, lib_tok: tokenizers.Tokenizer, tok_path: Path) -> None:
    assert tok.vocab_size == lib_tok.get_vocab_size(with_added_tokens=True)
    assert 700 <= tok.vocab_size <= 1000
    assert tok.eot_id == lib_tok.token_to_id(EOT) == 1
    assert tok.byte_level
    assert tok.name == "hf:tokenizer.json"
    assert str(tok_path) in repr(tok) and "HFTokenizer(" in repr(tok)
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(tok: HFTokenizer, lib_tok: tokenizers.Tokenizer, name: str) -> None:
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert ids == lib_tok.encode(text, add_special_tokens=False).ids
    assert lib_tok.encode(text).ids == [*ids, tok.eot_id]  # the post-processor is not applied
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode(ids) == text
    assert tok.decode(ids) == lib_tok.decode(ids, skip_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_special_and_added_tokens(tok: HFTokenizer, lib_tok: tokenizers.Tokenizer) -> None:
    ids = tok.encode(SAMPLES["eot_inside"])
    assert ids.count(tok.eot_id) == 1
    assert tok.decode_bytes([tok.eot_id]) == EOT.encode()
    spaces_id = lib_tok.token_to_id(SPACES_TOKEN)
    assert spaces_id is not None and spaces_id in tok.encode(SAMPLES["whitespace"])
    assert tok.decode_bytes([spaces_id]) == SPACES_TOKEN.encode()
    # A token learned by BPE: the library's vocab stores " the" as "Ġthe".
    assert tok.decode_bytes([lib_tok.token_to_id("\u0120the")]) == b" the"


def test_added_tokens_decode_to_their_content(tmp_path: Path) -> None:
    # Added tokens are matched on the raw text, so their content is text, not byte-level characters:
    # "<Ċ>" must decode to itself, not to "<\n>" (what mapping it through the byte table would give).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    lib = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    lib.add_tokens([AddedToken("<Ċ>", normalized=False), AddedToken("ĠĠ", normalized=True)])
    path = tmp_path / "added.json"
    lib.save(str(path))
    tok = HFTokenizer(path)
    text = "a<Ċ>bĠĠc\nd é"
    ids = tok.encode(text)
    assert lib.token_to_id("<Ċ>") in ids and lib.token_to_id("ĠĠ") in ids
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode(ids) == text


def test_a_character_is_split_across_tokens(tok: HFTokenizer, lib_tok: tokenizers.Tokenizer) -> None:
    for name in ("chinese", "emoji", "mixed"):
        text = SAMPLES[name]
        ids = tok.encode(text)
        partial = [i for i in ids if not _is_utf8(tok.decode_bytes([i]))]
        assert partial, f"no token of {name!r} ends inside a character: the test would prove nothing"
        # The per-token text (what a naive streamer would print) is broken there...
        assert any("\ufffd" in lib_tok.decode([i]) for i in partial)
        # ... but the streaming decoder never emits U+FFFD and gives back the text.
        decoder = IncrementalDecoder(tok)
        outputs = [decoder.feed(i) for i in ids]
        assert all("\ufffd" not in out for out in outputs)
        assert "".join(outputs) + decoder.flush() == text
        assert decoder.pending == b""


def test_streaming_holds_partial_character(tok: HFTokenizer) -> None:
    text = "龘"  # rare: not a single token of this small vocab
    ids = tok.encode(text)
    assert len(ids) > 1
    decoder = IncrementalDecoder(tok)
    assert decoder.feed(ids[0]) == ""
    assert decoder.pending == tok.decode_bytes(ids[:1]) and decoder.pending
    assert decoder.feed(ids[1:]) == text


def test_encode_errors(tok: HFTokenizer) -> None:
    assert tok.encode("") == []
    with pytest.raises(RwkvkitError, match="surrogate U\\+D800"):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_decode_out_of_range_raises(tok: HFTokenizer) -> None:
    size = tok.vocab_size
    for bad in (size, size + 5, 10**9, -1, -size):
        message = rf"token id {bad}\b.*valid ids are 0\.\.{size - 1} \(vocab_size={size}\)"
        for call in (tok.decode, tok.decode_bytes):
            with pytest.raises(RwkvkitError, match=message):
                call([5, bad])
        with pytest.raises(RwkvkitError, match=message):
            tok.token_bytes(bad)
    for bad in (1.5, None, "3"):
        with pytest.raises(RwkvkitError, match=re.escape(f"token id {bad!r} is outside the vocabulary")):
            tok.decode([5, bad])  # type: ignore[list-item]


def test_vocab_size_id_is_invalid_and_last_id_is_valid(tok: HFTokenizer) -> None:
    assert tok.decode_bytes([tok.vocab_size - 1])  # the added spaces token, the last id
    with pytest.raises(RwkvkitError, match=rf"token id {tok.vocab_size}\b"):
        tok.decode_bytes([tok.vocab_size])


def test_streaming_bad_id_raises_and_keeps_state(tok: HFTokenizer) -> None:
    ids = tok.encode("龘")
    decoder = IncrementalDecoder(tok)
    assert decoder.feed(ids[0]) == ""
    with pytest.raises(RwkvkitError):
        decoder.feed([ids[1], tok.vocab_size])
    assert decoder.feed(ids[1:]) == "龘"


# ------------------------------------------------------------------------------------------------
# Loading and bad files
# ------------------------------------------------------------------------------------------------


def test_load_tokenizer(tok_path: Path) -> None:
    for arg in (tok_path, str(tok_path)):
        loaded = load_tokenizer(arg)
        assert isinstance(loaded, HFTokenizer)
        assert loaded.encode("hello") == HFTokenizer(tok_path).encode("hello")


def test_load_tokenizer_missing_json(tmp_path: Path) -> None:
    missing = tmp_path / "20B_tokenizer.json"
    with pytest.raises(
        RwkvkitError, match=r"cannot read the tokenizer file .*20B_tokenizer\.json: No such file"
    ):
        load_tokenizer(missing)
    with pytest.raises(RwkvkitError, match=r"unknown tokenizer 'gpt9'.*tokenizer\.json"):
        load_tokenizer("gpt9")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RwkvkitError, match=r"cannot read the tokenizer file .*nope\.json"):
        HFTokenizer(tmp_path / "nope.json")


def test_directory(tmp_path: Path, tok_path: Path) -> None:
    with pytest.raises(RwkvkitError, match=r"is a directory, not a tokenizer\.json file$"):
        HFTokenizer(tmp_path)
    with pytest.raises(RwkvkitError, match=r"is a directory.*did you mean .*tokenizer\.json"):
        HFTokenizer(tok_path.parent)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"not valid JSON: Expecting value at line 1 column 1"),
        (b'{"model": {"type": "BPE", "vocab": {"a": 0}\n', r"not valid JSON: .* at line 2"),
        (b"\xff\xfe garbage", r"not valid UTF-8"),
        (b'{"vocab": {"a": 0}}', r'not a Hugging Face tokenizer file: it has no "model" object'),
        (b"[1, 2, 3]", r'not a Hugging Face tokenizer file: it has no "model" object'),
        (b'{"model": "BPE"}', r'not a Hugging Face tokenizer file: it has no "model" object'),
        (b'{"model": {"type": "NoSuchModel"}}', r"is not a valid Hugging Face tokenizer file: \S"),
        (b'{"model": {"type": "BPE", "vocab": {}, "merges": []}}', r"has an empty vocabulary"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(RwkvkitError, match=message) as info:
        HFTokenizer(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(RwkvkitError, match=message):
        load_tokenizer(path)


def test_without_tokenizers_package(monkeypatch: pytest.MonkeyPatch, tok_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(RwkvkitError, match=r"needs the 'tokenizers' package: pip install 'rwkvkit\[neox\]'"):
        HFTokenizer(tok_path)


def test_import_is_light() -> None:
    code = "import rwkvkit.tokenizer, sys\nassert 'tokenizers' not in sys.modules, 'tokenizers imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_vocab_with_gaps(tmp_path: Path) -> None:
    path = _write_json(
        tmp_path / "gaps.json",
        {
            "model": {"type": "BPE", "vocab": {"a": 0, "\u0120b": 7}, "merges": []},
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
        },
    )
    tok = HFTokenizer(path)
    assert tok.byte_level and tok.vocab_size == 8  # the largest id + 1, so id 7 is usable
    assert tok.decode_bytes([0, 7, 3]) == b"a b"  # id 3 has no token: nothing
    assert tok.eot_id == 0  # no <|endoftext|> in the vocab
    with pytest.raises(RwkvkitError, match="token id 8"):
        tok.decode([8])


def test_not_byte_level_falls_back_to_per_token_decode(tmp_path: Path) -> None:
    lib = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    lib.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wordlevel.json"
    lib.save(str(path))
    tok = HFTokenizer(path)
    assert not tok.byte_level
    assert tok.vocab_size == 3 and tok.eot_id == 0
    ids = tok.encode("hello   world  zzz")
    assert ids == [0, 1, 2]
    assert tok.decode(ids) == lib.decode(ids, skip_special_tokens=False) == "hello world [UNK]"
    assert tok.decode_bytes(ids) == b"".join(lib.decode([i]).encode() for i in ids) == b"helloworld[UNK]"
    with pytest.raises(RwkvkitError, match=r"token id 3\b.*valid ids are 0\.\.2"):
        tok.decode([0, 3])
    with pytest.raises(RwkvkitError, match=r"token id -1\b"):
        tok.decode_bytes([-1])
