"""rwkvkit.infer.constrained: JSON-mode / JSON-schema token masks on the World vocab.

Outputs sampled under the mask with seeded random logits are checked with ``json.loads`` and a small
validator written here (independent of llguidance) for the schema features used; the mask itself is
checked against the token bytes (what may start a JSON object, UTF-8 continuation bytes, end of text,
padding ids).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.constrained import compile_json_constraint
from rwkvkit.tokenizer import ByteTokenizer, WorldTokenizer

PAD = 64  # the model's vocab is the tokenizer's plus this many padding rows
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "scores", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("llguidance")
    return WorldTokenizer()


@pytest.fixture(scope="module")
def world_bytes(world):
    return [world.token_bytes(i) for i in range(world.vocab_size)]


def validate(value, schema, path="$"):
    """An independent check of ``value`` against the JSON-schema features used in these tests."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{path}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{path}: extra key {key!r}"
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9), f"{path}: length"
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind is not None:
        validate_scalar(value, schema, path)


def validate_scalar(value, schema, path):
    kind = schema["type"]
    if kind == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert len(value) <= schema.get("maxLength", 10**9), f"{path}: too long"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: not a boolean"
    else:
        assert kind in ("integer", "number") and not isinstance(value, bool), f"{path}: not a {kind}"
        assert isinstance(value, int if kind == "integer" else (int, float)), f"{path}: not a {kind}"
        assert schema.get("minimum", -np.inf) <= value <= schema.get("maximum", np.inf), f"{path}: range"


def closing_boost(token_bytes, vocab_size):
    """(V,) float32 logits bias: +4 for tokens holding a quote, comma or closing bracket (so that random
    sampling ends strings, numbers and containers in a reasonable number of tokens)."""
    boost = np.zeros(vocab_size, dtype=np.float32)
    for tid, data in enumerate(token_bytes):
        if any(c in data for c in b'"},]'):
            boost[tid] = 4.0
    return boost


def sample(grammar, eot_id, boost, rng, max_tokens=1500):
    """One sequence sampled under the mask with random logits; (token ids, completed?)."""
    matcher = grammar.new_matcher()
    ids = []
    for _ in range(max_tokens):
        mask = matcher.allowed_mask().numpy()  # (V,) bool
        assert mask.any(), "no token allowed"
        assert mask[eot_id] == matcher.is_complete()
        scores = boost + rng.gumbel(size=boost.shape[0]).astype(np.float32)  # Gumbel-max = sampling
        scores[~mask] = -np.inf
        token = int(np.argmax(scores))
        if token == eot_id:
            return ids, True
        matcher.advance(token)
        ids.append(token)
    return ids, False


def check_samples(tokenizer, token_bytes, schema, n, seed):
    grammar = compile_json_constraint(tokenizer, schema, vocab_size=tokenizer.vocab_size + PAD)
    boost = closing_boost(token_bytes, tokenizer.vocab_size + PAD)
    rng = np.random.default_rng(seed)
    outputs = []
    for _ in range(n):
        ids, done = sample(grammar, tokenizer.eot_id, boost, rng)
        assert done, "a sequence did not finish"
        text = tokenizer.decode_bytes(ids).decode("utf-8")  # strict: every byte sequence is valid UTF-8
        outputs.append(json.loads(text))
    return outputs


def test_schema_samples_validate(world, world_bytes):
    outputs = check_samples(world, world_bytes, SCHEMA, n=20, seed=0)
    for value in outputs:
        validate(value, SCHEMA)
    assert len({json.dumps(v) for v in outputs}) == 20  # the sampling explores, not one fixed output


def test_json_object_mode_gives_objects(world, world_bytes):
    for value in check_samples(world, world_bytes, None, n=10, seed=1):
        assert isinstance(value, dict)


def test_byte_tokenizer_samples_validate():
    pytest.importorskip("llguidance")
    tok = ByteTokenizer()
    small = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 6}}, "required": ["k"]}
    for value in check_samples(tok, [tok.token_bytes(i) for i in range(256)], small, n=5, seed=2):
        validate(value, small)


def test_forced_document_mask_eos_and_padding(world, world_bytes):
    V = world.vocab_size + PAD
    grammar = compile_json_constraint(world, SCHEMA, vocab_size=V)
    doc = {
        "name": "李雷 😀 ok",
        "age": 42,
        "color": "green",
        "scores": [1.5, -2e3],
        "address": {"city": "Zürich 🌉", "zip": "8001"},
    }
    ids = world.encode(json.dumps(doc, ensure_ascii=False))
    assert any(not _valid_utf8(world_bytes[t]) for t in ids)  # the emoji come as partial-UTF-8 tokens
    matcher = grammar.new_matcher()
    first = matcher.allowed_mask()
    assert first.shape == (V,) and first.dtype == torch.bool
    allowed_first = torch.nonzero(first).flatten().tolist()
    assert allowed_first and all(world_bytes[t].startswith(b"{") for t in allowed_first)
    assert not first[world.encode("a")[0]]
    for pos, token in enumerate(ids):
        mask = matcher.allowed_mask()
        assert mask is matcher.allowed_mask()  # computed once per position
        assert mask[token], f"token {pos} of the document refused"
        assert not mask[world.eot_id] and not matcher.is_complete()
        assert not mask[world.vocab_size :].any()  # padding rows never allowed
        matcher.advance(token)
    mask = matcher.allowed_mask()
    assert matcher.is_complete() and matcher.is_stopped()
    assert mask[world.eot_id] and int(mask.sum()) == 1  # end of text, and nothing else
    logits = torch.randn(V)
    matcher.mask_logits(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [world.eot_id]
    matcher.advance(world.eot_id)
    assert not matcher.is_dead()


def test_mask_logits_sets_disallowed_to_minus_inf(world):
    V = world.vocab_size + PAD
    matcher = compile_json_constraint(world, None, vocab_size=V).new_matcher()
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = matcher.mask_logits(logits)
    assert out is logits
    mask = matcher.allowed_mask()
    assert torch.equal(logits[mask], before[mask])
    assert torch.isneginf(logits[~mask]).all()
    assert torch.isneginf(logits[world.vocab_size :]).all() and torch.isneginf(logits[world.eot_id])
    with pytest.raises(RwkvkitError, match="vocab_size"):
        matcher.mask_logits(torch.zeros(world.vocab_size))


def test_utf8_inside_strings(world, world_bytes):
    grammar = compile_json_constraint(world, {"type": "object"}, vocab_size=world.vocab_size)
    matcher = grammar.new_matcher()
    for token in world.encode('{"s": "'):
        matcher.advance(token)
    mask = matcher.allowed_mask()
    assert not mask[world.encode_bytes(b"\x80")[0]]  # a lone continuation byte cannot start a character
    assert not mask[world.encode_bytes(b"\xff")[0]]  # never valid UTF-8
    assert mask[world.encode_bytes(b"\xf0\x9f")[0]]  # the first half of an emoji may start one
    matcher.advance(world.encode_bytes(b"\xf0\x9f")[0])
    allowed = torch.nonzero(matcher.allowed_mask()).flatten().tolist()
    assert allowed and all(0x80 <= world_bytes[t][0] <= 0xBF for t in allowed)  # only continuations now
    assert not matcher.allowed_mask()[world.encode('"')[0]]
    rest = world.encode_bytes("😀".encode()[2:] + b'"}')
    for token in rest:
        matcher.advance(token)
    assert matcher.is_complete()


def test_refused_token_kills_the_matcher(world):
    V = world.vocab_size + PAD
    matcher = compile_json_constraint(world, SCHEMA, vocab_size=V).new_matcher()
    with pytest.raises(RwkvkitError, match="refused token"):
        matcher.advance(world.encode("a")[0])
    assert matcher.is_dead() and matcher.error and "\n" not in matcher.error
    with pytest.raises(RwkvkitError, match="dead"):
        matcher.advance(world.encode("{")[0])
    padded = compile_json_constraint(world, SCHEMA, vocab_size=V).new_matcher()
    with pytest.raises(RwkvkitError, match="outside the vocabulary"):
        padded.advance(world.vocab_size + 3)
    assert padded.is_dead()


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "strin"}, "strin"),
        ({"type": "object", "properties": 5}, "properties"),
        ({"type": "object", "required": "a"}, "required"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "object", "minProperties": 3, "maxProperties": 1}, "minProperties"),
        ([{"type": "object"}], "must be a JSON object"),
    ],
)
def test_invalid_schema(world, schema, message):
    with pytest.raises(RwkvkitError, match=message) as info:
        compile_json_constraint(world, schema, vocab_size=world.vocab_size)
    assert info.value.param == "response_format"
    assert "\n" not in str(info.value)


def test_model_vocab_smaller_or_bad(world):
    matcher = compile_json_constraint(world, None, vocab_size=1000).new_matcher()
    assert matcher.allowed_mask().shape == (1000,)  # ids the model lacks are simply absent
    for bad in (0, -5, True, 3.0):
        with pytest.raises(RwkvkitError, match="vocab_size"):
            compile_json_constraint(world, None, vocab_size=bad)


def test_tokenizer_object_is_cached(world):
    a = compile_json_constraint(world, None, vocab_size=world.vocab_size)
    b = compile_json_constraint(WorldTokenizer(), SCHEMA, vocab_size=world.vocab_size + PAD)
    assert a._lltok is b._lltok


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(RwkvkitError, match=r"pip install 'rwkvkit\[serve\]'"):
        compile_json_constraint(ByteTokenizer(), None, vocab_size=256)


def test_import_is_lazy():
    code = "import sys, rwkvkit.infer.constrained; print('llguidance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
