"""Tests for the tokenizer endpoints of ``rwkvkit serve`` (``/tokenize``, ``/detokenize``,
``/tokenizer_info``) on a real uvicorn server (the helpers of tests/test_server.py), and
lm-evaluation-harness' own remote tokenizer (``lm_eval.utils.RemoteTokenizer``) against it.

Expected ids come from rwkvkit's tokenizers called directly, with chat prompts written out by hand in the
World format (not built by the server's code).
"""

from __future__ import annotations

import httpx
import pytest
from checkpoints import random_state_dict
from test_server import KEY, _serve

from rwkvkit.tokenizer import ByteTokenizer, WorldTokenizer

WORLD = "world-model"
BYTE = "byte-model"
LIMIT = 256
JSON = {"Content-Type": "application/json"}


def _start(sd, tokenizer: str, api_key: str | None, name: str):
    server, served = _serve(sd, tokenizer, api_key, None, 2, 4, LIMIT, name, cache=False)
    return server, served


@pytest.fixture(scope="module")
def world():
    """A tiny World-vocab model without an API key."""
    sd = random_state_dict("7", n_layer=1, n_embd=32, head_size=16, vocab_size=65536, seed=21)
    server, served = _start(sd, "world", None, WORLD)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


@pytest.fixture(scope="module")
def byte():
    """A byte-vocab model with an API key."""
    sd = random_state_dict("7", n_layer=1, n_embd=32, head_size=16, vocab_size=256, seed=22)
    server, served = _start(sd, "byte", KEY, BYTE)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


def _error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error


TEXT = "Hello, world! Ünïcödé 中文 and an emoji 🙂 <|endoftext|>\n\nUser: x"


def test_tokenize_prompt_equals_the_tokenizer(world):
    want = WorldTokenizer().encode(TEXT)
    r = world.http.post("/tokenize", json={"model": WORLD, "prompt": TEXT, "add_special_tokens": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"count": len(want), "max_model_len": LIMIT, "tokens": want, "token_strs": None}
    assert 0 not in body["tokens"]  # the literal <|endoftext|> is text, as in the generation endpoints
    # the same ids as /v1/completions reads (its usage counts them)
    done = world.client.completions.create(model=WORLD, prompt=TEXT, max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == len(want)
    # without "model" and without add_special_tokens (nothing is added either way)
    assert world.http.post("/tokenize", json={"prompt": TEXT}).json()["tokens"] == want
    assert world.http.post("/tokenize", json={"prompt": ""}).json()["count"] == 0


def test_token_strs_are_the_token_bytes_as_latin1(world, byte):
    world_tok = WorldTokenizer()
    body = world.http.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()
    assert len(body["token_strs"]) == body["count"]
    for token, text in zip(body["tokens"], body["token_strs"], strict=True):
        assert text.encode("latin-1") == world_tok.decode_bytes([token])
    assert b"".join(s.encode("latin-1") for s in body["token_strs"]) == TEXT.encode("utf-8")
    # a byte model splits characters: each piece is still exact
    body = byte.http.post("/tokenize", json={"prompt": "é🙂", "return_token_strs": True}).json()
    assert body["tokens"] == list("é🙂".encode())
    assert [s.encode("latin-1") for s in body["token_strs"]] == [bytes([b]) for b in "é🙂".encode()]


def test_tokenize_chat_messages_is_the_chat_prompt(world):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\n\n\nthere  "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ]
    by_hand = "System: Be brief.\n\nUser: Hi\nthere\n\nAssistant: Hello.\n\nUser: Why?"
    tok = WorldTokenizer()
    r = world.http.post("/tokenize", json={"model": WORLD, "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tok.encode(by_hand + "\n\nAssistant:")
    # /v1/chat/completions reads the same prompt
    done = world.client.chat.completions.create(model=WORLD, messages=messages, max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == r.json()["count"]
    r = world.http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert r.json()["tokens"] == tok.encode(by_hand)


def test_detokenize(world, byte):
    tok = WorldTokenizer()
    ids = tok.encode(TEXT)
    r = world.http.post("/detokenize", json={"model": WORLD, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}
    assert world.http.post("/detokenize", json={"tokens": [0, *ids, 0]}).json()["prompt"] == TEXT
    assert world.http.post("/detokenize", json={"tokens": []}).json()["prompt"] == ""
    # a character cut off decodes to U+FFFD, as the generation endpoints' text does
    cut = list("é".encode())[:1]
    assert byte.http.post("/detokenize", json={"tokens": cut}).json()["prompt"] == "\ufffd"
    assert byte.http.post("/detokenize", json={"tokens": list("aé".encode())}).json()["prompt"] == "aé"


def test_tokenizer_endpoint_errors(world, byte):
    for bad in ([65536], [5, -1], [2**40]):
        error = _error(world.http.post("/detokenize", json={"tokens": bad}), 400, "tokens")
        assert str(bad[-1]) in error["message"] and "vocabulary" in error["message"]
    _error(byte.http.post("/detokenize", json={"tokens": [256]}), 400, "tokens")
    _error(world.http.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens")
    _error(world.http.post("/detokenize", json={}), 400, "tokens")
    _error(world.http.post("/tokenize", json={}), 400, "prompt")
    both = {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    _error(world.http.post("/tokenize", json=both), 400, "prompt")
    _error(world.http.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    surrogate = b'{"prompt": "\\ud800"}'  # JSON can carry a lone surrogate
    _error(world.http.post("/tokenize", content=surrogate, headers=JSON), 400, "prompt")
    _error(world.http.post("/tokenize", json={"messages": []}), 400, "messages")
    _error(world.http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model")
    _error(world.http.post("/detokenize", json={"tokens": [1], "model": "other"}), 404, "model")
    # keyed like /v1/* when the server has an API key
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(byte.url + path, json=body).status_code == 401
        assert byte.http.post(path, json=body).status_code == 200
    assert httpx.get(byte.url + "/tokenizer_info").status_code == 401


def test_tokenizer_info(world, byte):
    info = world.http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "WorldTokenizer" and info["vocab_size"] == 65536
    assert info["eos_token"] == info["bos_token"] == info["pad_token"] == "<|endoftext|>"
    assert info["eos_token_id"] == info["bos_token_id"] == 0
    assert info["model_max_length"] == LIMIT and info["chat_template"] is None
    info = byte.http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "ByteTokenizer" and info["eos_token"] == "\x00"


def test_lm_eval_remote_tokenizer_round_trip(world, byte):
    pytest.importorskip("lm_eval")
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    # what lm-eval's local-completions model calls to choose tokenizer_backend=remote on its own
    assert check_remote_tokenizer_support(world.url + "/v1/completions")
    remote = RemoteTokenizer(world.url + "/v1/completions", timeout=30)
    tok = WorldTokenizer()
    texts = [TEXT, " leading space", "line\nbreaks\r\n\ttabs", "a" * 300]
    for text in texts:
        ids = remote.encode(text)
        assert ids == tok.encode(text)
        assert remote.decode(ids) == text
    assert remote.batch_decode([tok.encode(t) for t in texts]) == texts
    assert remote(texts[0])["input_ids"] == tok.encode(texts[0])
    assert remote.eos_token == "<|endoftext|>"

    # a keyed server: auth_token; the byte vocabulary's end of text (NUL) comes back as id 0
    assert not check_remote_tokenizer_support(byte.url)
    assert check_remote_tokenizer_support(byte.url, auth_token=KEY)
    remote = RemoteTokenizer(byte.url, timeout=30, auth_token=KEY)
    assert remote.encode("aé") == ByteTokenizer().encode("aé") and remote.decode([97, 195, 169]) == "aé"
    assert remote.eos_token_id == 0 and remote.bos_token_id == 0
