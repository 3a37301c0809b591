"""Tests of the World tokenizer as a transformers tokenizer (rwkvkit.hf.tokenization_rwkv_world) and of the
files that put it into a model folder (rwkvkit.hf.tokenizer_files).

Every folder is written with ``write_world_tokenizer_files`` and loaded the way a user would, with
``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)``. Ids are checked against rwkvkit's
``WorldTokenizer`` and the reference ``rwkv`` package's ``TRIE_TOKENIZER`` (with that package's own copy of
the vocab); decoding against the original text and rwkvkit's decode.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import rwkv  # noqa: E402
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER  # noqa: E402

from rwkvkit.hf.tokenizer_files import TOKENIZER_MODULE_PATH, write_world_tokenizer_files  # noqa: E402
from rwkvkit.tokenizer.world import DEFAULT_VOCAB_PATH, WorldTokenizer  # noqa: E402

REF_VOCAB = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
ROOT = Path(__file__).resolve().parents[1]

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "cjk": "你好，世界！日本語のテキストと한국어 문장도 있습니다。",
    "emoji": "Party 🎉🎉 time 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, skin 👍🏽",
    "code": "def f(x):\n\tif x:\n\t\treturn  x  *  2\n    else:\n        return None\n\n\n# end  \n",
    "mixed": "Ünïcödé Ελληνικά русский עברית العربية हिन्दी ไทย 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "crlf": "line one\r\nline two\r\n\r\nlast\r",
    "odd_unicode": "e\u0301 a\u200db \u200b\ufeff \u0000\u0007\x7f \U0010ffff \ufffd",
    "special_text": "before <|endoftext|> after",
    "spaces": "   leading and trailing   ",
    "punctuation": "a , b . c ' d n't e !",  # clean_up_tokenization_spaces would change it
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("world_tok")
    write_world_tokenizer_files(path)
    return path


@pytest.fixture(scope="module")
def tok(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def ref() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(REF_VOCAB))


def _fallback(tok, monkeypatch: pytest.MonkeyPatch):
    """A new tokenizer of tok's class, built while rwkvkit's encoder is reported unimportable."""
    module = sys.modules[type(tok).__module__]
    monkeypatch.setattr(module, "_rwkvkit_world_tokenizer_class", lambda: None)
    fallback = type(tok)(vocab_file=tok.vocab_file)
    assert isinstance(fallback._get_encoder(), module._ByteTrie)
    return fallback


def test_written_files(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [
            "rwkv_vocab_v20230424.txt",
            "tokenization_rwkv_world.py",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    )
    assert (folder / "rwkv_vocab_v20230424.txt").read_bytes() == DEFAULT_VOCAB_PATH.read_bytes()
    assert (folder / "tokenization_rwkv_world.py").read_text("utf-8") == TOKENIZER_MODULE_PATH.read_text(
        "utf-8"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_rwkv_world.RwkvWorldTokenizer", None]}
    assert config["clean_up_tokenization_spaces"] is False
    special = json.loads((folder / "special_tokens_map.json").read_text("utf-8"))
    assert special == {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }


def test_module_is_self_contained() -> None:
    """The remote-code module imports only the standard library and transformers."""
    tree = ast.parse(TOKENIZER_MODULE_PATH.read_text("utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - {"__future__", "transformers"} <= set(sys.stdlib_module_names)


def test_core_modules_do_not_import_transformers() -> None:
    code = "import sys, rwkvkit.hf, rwkvkit.hf.tokenizer_files; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_and_decode_match_references(tok, world: WorldTokenizer, ref: TRIE_TOKENIZER, name: str) -> None:
    text = TEXTS[name]
    ids = tok(text)["input_ids"]
    assert ids == world.encode(text) == ref.encode(text)
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text == world.decode(ids)
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text
    assert [tok.convert_tokens_to_ids(t) for t in tok.tokenize(text)] == ids


def test_partial_characters_decode_like_rwkvkit(tok, world: WorldTokenizer) -> None:
    ids = world.encode(TEXTS["emoji"] + TEXTS["cjk"])
    for end in range(len(ids) + 1):
        assert tok.decode(ids[:end]) == world.decode(ids[:end])
    # Raw bytes that are not UTF-8: the tokens keep the bytes, U+FFFD appears only in the final text.
    raw = b"\xff\xfe abc \xe4\xbd"
    raw_ids = world.encode_bytes(raw)
    tokens = tok.convert_ids_to_tokens(raw_ids)
    assert "".join(tokens).encode("latin-1") == raw
    assert tok.decode(raw_ids) == raw.decode("utf-8", errors="replace") == world.decode(raw_ids)


def test_special_and_unused_ids(tok, world: WorldTokenizer) -> None:
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 0)
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    assert tok.vocab_size == len(tok) == world.vocab_size == 65536
    ids = [0, *world.encode("hi"), 0, 65530, 65535]
    assert tok.decode(ids) == world.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([65536])


def test_no_special_tokens_added(tok, world: WorldTokenizer) -> None:
    text = "Hello"
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"] == world.encode(text)
    assert tok("")["input_ids"] == []
    assert tok.num_special_tokens_to_add() == 0
    # the literal text of the end-of-text token is ordinary bytes, as in RWKV
    assert 0 not in tok("<|endoftext|>")["input_ids"]


def test_batch_and_padding(tok, world: WorldTokenizer) -> None:
    texts = [TEXTS["english"], "hi", TEXTS["cjk"]]
    expected = [world.encode(t) for t in texts]
    batch = tok(texts)
    assert batch["input_ids"] == expected
    assert tok.batch_decode(batch["input_ids"]) == texts
    width = max(map(len, expected))
    for side in ("right", "left"):
        padded = tok(texts, padding=True, padding_side=side, return_tensors="pt")
        assert padded["input_ids"].shape == (3, width)
        for row, ids in enumerate(expected):
            pad = [0] * (width - len(ids))
            mask = [0] * len(pad) + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * len(pad)
            assert padded["input_ids"][row].tolist() == (pad + ids if side == "left" else ids + pad)
            assert padded["attention_mask"][row].tolist() == mask
        assert tok.batch_decode(padded["input_ids"], skip_special_tokens=True) == texts
        assert tok.batch_decode(padded["input_ids"]) == texts  # id 0 decodes to "" anyway


def test_fallback_trie_matches_rwkvkit(tok, world: WorldTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = _fallback(tok, monkeypatch)
    for text in TEXTS.values():
        assert fallback(text)["input_ids"] == world.encode(text)
        assert fallback.decode(world.encode(text)) == text
    raw = bytes(range(256)) + b"\xe4\xbd\xa0\xe5"
    assert fallback._get_encoder().encode_bytes(raw) == world.encode_bytes(raw)


def test_loads_without_rwkvkit(folder: Path, world: WorldTokenizer) -> None:
    """A user with transformers but not rwkvkit: the folder loads and encodes with the module's own trie."""
    code = (
        "import json, sys\n"
        "sys.modules['rwkvkit'] = None  # import rwkvkit now raises ImportError\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        "assert type(tok._get_encoder()).__name__ == '_ByteTrie'\n"
        f"ids = tok({TEXTS['mixed']!r})['input_ids']\n"
        "print(json.dumps([ids, tok.decode(ids)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=folder)
    ids, text = json.loads(out.stdout.strip().splitlines()[-1])
    assert ids == world.encode(TEXTS["mixed"])
    assert text == TEXTS["mixed"]


def test_save_pretrained_round_trip(tok, world: WorldTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == DEFAULT_VOCAB_PATH.read_bytes()
    assert (tmp_path / "tokenization_rwkv_world.py").is_file()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    for text in TEXTS.values():
        assert again(text)["input_ids"] == world.encode(text)
    assert (again.pad_token_id, again.eos_token_id, again.bos_token_id) == (0, 0, 0)
    assert again.clean_up_tokenization_spaces is False
    again.save_pretrained(tmp_path)  # saving over its own folder keeps the vocab intact
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == DEFAULT_VOCAB_PATH.read_bytes()


def test_corrupt_vocab_gives_a_clear_error(tmp_path: Path) -> None:
    write_world_tokenizer_files(tmp_path)
    vocab = tmp_path / "rwkv_vocab_v20230424.txt"
    lines = vocab.read_text("utf-8").split("\n")
    assert lines[1000].endswith(" " + lines[1000].rsplit(" ", 1)[1])
    idx, rest = lines[1000].split(" ", 1)
    literal, length = rest.rsplit(" ", 1)
    lines[1000] = f"{idx} {literal} {int(length) + 1}"
    vocab.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"rwkv_vocab_v20230424.txt:1001: the token is \d+ bytes long but"):
        transformers.AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)


def test_bad_remote_code_name(tmp_path: Path) -> None:
    from rwkvkit.errors import RwkvkitError

    with pytest.raises(RwkvkitError, match="remote_code_name"):
        write_world_tokenizer_files(tmp_path, remote_code_name="../evil.py")


def test_lone_surrogate_is_a_clear_error(tok) -> None:
    with pytest.raises(ValueError, match="lone surrogate U\\+D800"):
        tok("a\ud800b")


def test_vocab_parser_matches_rwkvkit() -> None:
    from rwkvkit.hf.tokenization_rwkv_world import parse_world_vocab
    from rwkvkit.tokenizer.world import parse_vocab_file

    assert parse_world_vocab(DEFAULT_VOCAB_PATH) == parse_vocab_file(DEFAULT_VOCAB_PATH)


def test_direct_instance_saves_a_loadable_folder(world: WorldTokenizer, tmp_path: Path) -> None:
    from rwkvkit.hf.tokenization_rwkv_world import RwkvWorldTokenizer

    RwkvWorldTokenizer(vocab_file=str(DEFAULT_VOCAB_PATH)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text("utf-8"))
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_rwkv_world.RwkvWorldTokenizer"
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded(TEXTS["emoji"])["input_ids"] == world.encode(TEXTS["emoji"])
