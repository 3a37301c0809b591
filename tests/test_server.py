"""Tests for ``rwkvkit serve`` (rwkvkit.infer.server): a real uvicorn server on 127.0.0.1, driven with the
official ``openai`` client and raw ``httpx``.

Expected texts come from :func:`rwkvkit.infer.generate_text` (greedy) on a separate copy of the model,
with prompts built by hand here (the World chat format of the architecture notes), not by the server.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from checkpoints import random_state_dict

from rwkvkit.cli import main
from rwkvkit.infer import generate_text, prefill
from rwkvkit.infer.cache import PrefixCache
from rwkvkit.infer.engine import Engine
from rwkvkit.infer.server import create_app
from rwkvkit.models import model_from_state_dict
from rwkvkit.state_io import save_state
from rwkvkit.tokenizer import load_tokenizer

KEY = "test-key-123"
BYTE_MODEL = "byte-model"
WORLD_MODEL = "world-model"
LIMIT = 2048  # max_tokens limit of the byte server
NO_EOT = {"0": -100}  # logit_bias that keeps a random model from ending at the end-of-text token


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            assert self.thread.is_alive(), "the server thread died"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Served:
    """One running server and what the tests need to check it."""

    def __init__(self, url: str, engine: Engine, ref_model, tokenizer, api_key: str | None, state_dir):
        self.url = url
        self.engine = engine
        self.ref = ref_model  # a separate copy of the weights, for expected outputs
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.state_dir = state_dir
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)
        self.client = openai.OpenAI(
            base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=60
        )

    def close(self) -> None:
        self.http.close()
        self.client.close()

    def metrics(self) -> dict:
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["running"] == 0 and m["waiting"] == 0:
                return m
            assert time.monotonic() < deadline, f"the engine is still busy: {m}"
            time.sleep(0.02)


def _serve(sd, tokenizer_name, api_key, state_dir, max_batch, max_waiting, limit, model_name, cache=True):
    tokenizer = load_tokenizer(tokenizer_name)
    engine = Engine(
        model_from_state_dict(sd),
        tokenizer,
        max_batch=max_batch,
        max_waiting=max_waiting,
        cache=PrefixCache(2**24) if cache else None,
    )
    engine.start()
    app = create_app(engine, model_name, api_key=api_key, max_tokens_limit=limit, state_dir=state_dir)
    server = ServerThread(app).__enter__()
    served = Served(server.url, engine, model_from_state_dict(sd), tokenizer, api_key, state_dir)
    return server, served


@pytest.fixture(scope="module")
def byte_sd():
    return random_state_dict("7", n_layer=2, n_embd=64, vocab_size=256, seed=11)


@pytest.fixture(scope="module")
def byte(byte_sd, tmp_path_factory):
    """A byte-vocab model with an API key, a prefix cache and a state directory."""
    state_dir = tmp_path_factory.mktemp("srv") / "states"  # created by the server
    server, served = _serve(byte_sd, "byte", KEY, state_dir, 4, 8, LIMIT, BYTE_MODEL)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


@pytest.fixture(scope="module")
def world():
    """A (tiny) World-vocab model without an API key and without state files."""
    sd = random_state_dict("7", n_layer=1, n_embd=32, head_size=16, vocab_size=65536, seed=12)
    server, served = _serve(sd, "world", None, None, 4, 8, 256, WORLD_MODEL)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


@pytest.fixture(scope="module")
def tiny(byte_sd):
    """One slot and no waiting room: a second request while one runs is refused with 429."""
    server, served = _serve(byte_sd, "byte", None, None, 1, 0, 100_000, BYTE_MODEL, cache=False)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


def _greedy(served: Served, prompt, max_tokens: int, **kwargs):
    return generate_text(served.ref, served.tokenizer, prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def _sse_events(raw: bytes) -> list[str]:
    """The payloads of a raw SSE body, checking the framing: each event is one data line + a blank line."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-50:]
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event[len("data: ") :] for event in events]


# ---------------------------------------------------------------------------------------------- basics


def test_health_models_and_metrics(byte):
    r = httpx.get(byte.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [m.id for m in byte.client.models.list().data] == [BYTE_MODEL]
    assert byte.client.models.retrieve(BYTE_MODEL).id == BYTE_MODEL
    with pytest.raises(openai.NotFoundError):
        byte.client.models.retrieve("another-model")

    before = byte.metrics()
    for _ in range(2):  # the same prompt twice: the second one starts from the cached prefix state
        byte.client.completions.create(model=BYTE_MODEL, prompt="cache me", max_tokens=2, temperature=0)
    after = byte.wait_idle()
    for key in ("waiting", "running", "tokens_per_second", "requests", "finished", "generated_tokens"):
        assert key in after, key
    cache = after["prefix_cache"]
    assert {"hits", "misses", "hit_rate"} <= set(cache)
    assert cache["hits"] >= before["prefix_cache"]["hits"] + 1
    assert after["requests"] == before["requests"] + 2
    assert after["server"]["http_5xx"] == before["server"]["http_5xx"]


def test_completion_equals_greedy_generate_text(byte):
    prompt = "The quick brown fox"
    expected = _greedy(byte, prompt, 24)  # stops at the end-of-text token (0), as the server does
    r = byte.client.completions.create(
        model=BYTE_MODEL, prompt=prompt, max_tokens=24, temperature=0, user="x"
    )
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == len(expected.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "text_completion" and r.model == BYTE_MODEL and r.id.startswith("cmpl-")

    # a stop string taken from the middle of the expected text ends the completion there
    assert len(expected.text) >= 10
    stop = expected.text[6:8]
    want = _greedy(byte, prompt, 24, stop_strings=[stop, "never-there"])
    r = byte.client.completions.create(
        model=BYTE_MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never-there"]
    )
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].text) <= 6
    r = byte.client.completions.create(
        model=BYTE_MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop
    )
    assert r.choices[0].text == want.text

    # a prompt of token ids
    ids = [72, 105, 33]
    r = byte.client.completions.create(model=BYTE_MODEL, prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == _greedy(byte, ids, 10).text


def test_seeded_sampling_is_reproducible(byte):
    kwargs = dict(model=BYTE_MODEL, prompt="Once upon", max_tokens=16, temperature=1.0, top_p=0.9)
    extra = {"top_k": 50, "min_p": 0.01}
    a = byte.client.completions.create(
        seed=7, presence_penalty=0.5, frequency_penalty=0.2, extra_body=extra, **kwargs
    )
    b = byte.client.completions.create(
        seed=7, presence_penalty=0.5, frequency_penalty=0.2, extra_body=extra, **kwargs
    )
    assert a.choices[0].text == b.choices[0].text
    others = {byte.client.completions.create(seed=s, **kwargs).choices[0].text for s in range(8, 12)}
    assert len(others | {a.choices[0].text}) > 1


def test_streamed_completion_equals_the_whole_one(byte):
    prompt, n = "Streaming test: ", 40
    whole = byte.client.completions.create(model=BYTE_MODEL, prompt=prompt, max_tokens=n, temperature=0)
    chunks = list(
        byte.client.completions.create(
            model=BYTE_MODEL,
            prompt=prompt,
            max_tokens=n,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    body = {"model": BYTE_MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    with byte.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    events = _sse_events(raw)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert "".join(p["choices"][0]["text"] for p in payloads) == whole.choices[0].text
    assert len(payloads) > 3  # streamed piece by piece, not in one go


# ---------------------------------------------------------------------------------------------- chat


def test_chat_equals_greedy_on_the_world_prompt(world):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me\n\n\nmore"}]},
    ]
    prompt = (
        "System: You are terse.\n\nUser: Hi there\n\nAssistant: Hello!\n\nUser: Tell me\nmore\n\nAssistant:"
    )
    ref = _greedy(world, prompt, 12, stop_strings=["\n\nUser:"])
    expected = ref.text[1:] if ref.text.startswith(" ") else ref.text
    r = world.client.chat.completions.create(
        model=WORLD_MODEL, messages=messages, max_tokens=12, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(world.tokenizer.encode(prompt))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")

    r2 = world.client.chat.completions.create(
        model=WORLD_MODEL, messages=messages, max_completion_tokens=12, temperature=0
    )
    assert r2.choices[0].message.content == expected

    stream = world.client.chat.completions.create(
        model=WORLD_MODEL, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    body = {"model": WORLD_MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
    with world.http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = _sse_events(r.read())
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant"}


def test_chat_on_the_byte_model_with_client_stops(byte):
    # The server adds '\n\nUser:' to the client's stops; a random model rarely writes it, so this checks
    # that the client's stop works beside it and that the reply equals the reference with both.
    messages = [{"role": "user", "content": "Say something"}]
    prompt = "User: Say something\n\nAssistant:"
    free = _greedy(byte, prompt, 30)
    stop = free.text[8:10]
    ref = _greedy(byte, prompt, 30, stop_strings=["\n\nUser:", stop])
    expected = ref.text[1:] if ref.text.startswith(" ") else ref.text
    r = byte.client.chat.completions.create(
        model=BYTE_MODEL, messages=messages, max_tokens=30, temperature=0, stop=stop
    )
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- embeddings


def _reference_embedding(served: Served, text: str) -> torch.Tensor:
    _, state = prefill(served.ref, served.tokenizer.encode(text))
    v = state.ffn_shift[-1, 0].float()
    return v / v.norm()


def test_embeddings(byte):
    r = byte.client.embeddings.create(model=BYTE_MODEL, input=["hello", "world", "hello"])
    vectors = [torch.tensor(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(v.shape == (64,) for v in vectors)
    for v in vectors:
        assert math.isclose(float(v.norm()), 1.0, abs_tol=1e-5)
    assert torch.equal(vectors[0], vectors[2])
    assert not torch.allclose(vectors[0], vectors[1], atol=1e-3)
    torch.testing.assert_close(vectors[0], _reference_embedding(byte, "hello"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vectors[1], _reference_embedding(byte, "world"), atol=1e-5, rtol=1e-5)
    assert r.usage.prompt_tokens == 15

    raw = byte.http.post(
        "/v1/embeddings",
        json={"model": BYTE_MODEL, "input": [104, 101, 108, 108, 111], "encoding_format": "float"},
    )
    assert raw.status_code == 200
    body = raw.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    torch.testing.assert_close(torch.tensor(body["data"][0]["embedding"]), vectors[0], atol=1e-6, rtol=1e-6)

    many = byte.client.embeddings.create(
        model=BYTE_MODEL, input=[f"text {i}" for i in range(11)]
    )  # > max_batch
    assert len(many.data) == 11
    with pytest.raises(openai.BadRequestError):
        byte.client.embeddings.create(model=BYTE_MODEL, input="")
    with pytest.raises(openai.BadRequestError):
        byte.client.embeddings.create(model=BYTE_MODEL, input="x", dimensions=3)


# ---------------------------------------------------------------------------------------------- errors


def _check_error(e: openai.APIStatusError, status: int, param: str | None = None) -> dict:
    assert e.status_code == status
    error = e.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


BAD_COMPLETIONS = [
    ({"temperature": 3.0}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"999": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"max_tokens": LIMIT + 1}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 300]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, 2], [3, 300]]}, "prompt"),
    ({"prompt": ["one", ""]}, "prompt"),
    ({"prompt": [[1]] * 65}, "prompt"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"seed": 2**70}, "seed"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize(("change", "param"), BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completion_parameters_are_400(byte, change, param):
    body = {"model": BYTE_MODEL, "prompt": "hi", "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as info:
        byte.client.completions.create(**body)
    _check_error(info.value, 400, param)


def test_errors_through_the_client(byte, world):
    with pytest.raises(openai.NotFoundError) as info:
        byte.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert _check_error(info.value, 404, "model")["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        byte.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        byte.client.embeddings.create(model="gpt-4", input="hi")

    wrong = openai.OpenAI(base_url=byte.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=BYTE_MODEL, prompt="hi", max_tokens=2)
    _check_error(info.value, 401)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    bad_chats = [
        {"messages": []},
        {"messages": [{"role": "function", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user"}], "max_tokens": 300},
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10_000},
        {"messages": [{"role": "user", "content": 5}]},
    ]
    for change in bad_chats:
        with pytest.raises(openai.BadRequestError) as info:
            world.client.chat.completions.create(model=WORLD_MODEL, **change)
        _check_error(info.value, 400)


def test_raw_http_errors(byte):
    server_errors = byte.metrics()["server"]["http_5xx"]
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b"", 400),
        (b'{"prompt": "hi"}', 400),  # no model
        (b'{"model": "byte-model"}', 400),  # no prompt
        (b'{"model": "byte-model", "prompt": "\\ud800"}', 400),  # a lone surrogate
        (b'{"model": "byte-model", "prompt": "hi", "temperature": NaN}', 400),
        (b'{"model": "byte-model", "prompt": "hi", "max_tokens": 1e400}', 400),
        (b'{"model": "\\ud800", "prompt": "hi"}', 404),
    ]
    for content, status in cases:
        r = byte.http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (content, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(byte.url + "/v1/completions", json={"model": BYTE_MODEL, "prompt": "hi"})  # no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(byte.url + "/metrics").status_code == 401
    r = byte.http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = byte.http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    assert byte.metrics()["server"]["http_5xx"] == server_errors


def test_overload_is_429_with_retry_after(tiny):
    body = {"model": BYTE_MODEL, "prompt": "long", "max_tokens": 50_000, "logit_bias": NO_EOT, "stream": True}
    with httpx.Client(base_url=tiny.url, timeout=60) as long_client:
        with long_client.stream("POST", "/v1/completions", json=body) as long_stream:
            assert long_stream.status_code == 200
            lines = long_stream.iter_lines()  # kept: dropping the iterator closes the stream
            next(lines)  # the first token: the request holds the only slot
            with pytest.raises(openai.RateLimitError) as info:
                tiny.client.completions.create(model=BYTE_MODEL, prompt="another", max_tokens=2)
            error = _check_error(info.value, 429)
            assert error["code"] == "server_busy"
            assert info.value.response.headers["retry-after"] == "1"
            r = tiny.http.post(
                "/v1/chat/completions", json={"model": BYTE_MODEL, "messages": [{"role": "user"}]}
            )
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            r = tiny.http.post("/v1/embeddings", json={"model": BYTE_MODEL, "input": "x"})
            assert r.status_code == 429
            assert next(line for line in lines if line).startswith("data: ")  # still going
    metrics = tiny.wait_idle()
    assert metrics["rejected"] >= 3
    r = tiny.client.completions.create(model=BYTE_MODEL, prompt="after", max_tokens=3)  # served again
    assert r.usage.completion_tokens == 3 or r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- disconnects


def test_closing_a_stream_frees_its_slot(byte):
    byte.wait_idle()
    before = byte.metrics()
    body = {
        "model": BYTE_MODEL,
        "prompt": "a long story",
        "max_tokens": LIMIT,
        "logit_bias": NO_EOT,
        "stream": True,
    }
    with httpx.Client(base_url=byte.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen == 3:
                    break
            assert byte.metrics()["running"] == 1
    t0 = time.monotonic()
    after = byte.wait_idle(timeout=5)
    assert time.monotonic() - t0 < 5
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["server"]["client_disconnects"] == before["server"]["client_disconnects"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LIMIT // 2  # stopped well before the end
    assert after["server"]["active_streams"] == 0
    r = byte.client.completions.create(model=BYTE_MODEL, prompt="next", max_tokens=3, temperature=0)
    assert r.choices[0].text == _greedy(byte, "next", 3).text


def test_leaving_a_non_streamed_request_frees_its_slot(byte):
    byte.wait_idle()
    before = byte.metrics()
    body = json.dumps(
        {"model": BYTE_MODEL, "prompt": "wait for me", "max_tokens": LIMIT, "logit_bias": NO_EOT}
    ).encode()
    host, port = byte.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 5
        while byte.metrics()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    after = byte.wait_idle(timeout=5)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < LIMIT // 2


# ---------------------------------------------------------------------------------------------- state files


def test_save_a_state_then_continue_from_it(byte):
    first, second = "My name is Ada.", " What is my name?"
    ref1 = _greedy(byte, first, 8)
    ref2 = _greedy(byte, second, 8, state=ref1.state)
    r1 = byte.client.completions.create(
        model=BYTE_MODEL, prompt=first, max_tokens=8, temperature=0, extra_body={"save_state": "ada"}
    )
    assert r1.choices[0].text == ref1.text
    assert (byte.state_dir / "ada.safetensors").is_file()
    r2 = byte.client.completions.create(
        model=BYTE_MODEL, prompt=second, max_tokens=8, temperature=0, extra_body={"state": "ada.safetensors"}
    )
    assert r2.choices[0].text == ref2.text
    assert r2.choices[0].text != _greedy(byte, second, 8).text  # the state mattered

    # streamed, chat, and both fields at once (continue and overwrite)
    chunks = byte.client.completions.create(
        model=BYTE_MODEL,
        prompt=second,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"state": "ada", "save_state": "ada-2"},
    )
    assert "".join(c.choices[0].text for c in chunks) == ref2.text
    ref3 = _greedy(byte, " Again?", 5, state=ref2.state)
    r3 = byte.client.completions.create(
        model=BYTE_MODEL, prompt=" Again?", max_tokens=5, temperature=0, extra_body={"state": "ada-2"}
    )
    assert r3.choices[0].text == ref3.text
    r = byte.client.chat.completions.create(
        model=BYTE_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        extra_body={"save_state": "chat_1.safetensors"},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (byte.state_dir / "chat_1.safetensors").is_file()
    assert byte.metrics()["server"]["state_files_written"] >= 3


BAD_NAMES = [
    "../x",
    "/etc/passwd",
    "a/b",
    "..",
    "a\\b",
    ".hidden",
    "",
    "x/../../y",
    "..safetensors",
    "a\x00b",
]


def test_state_names_must_stay_inside_the_state_dir(byte, tmp_path):
    parent = byte.state_dir.parent
    outside_before = sorted(p.name for p in parent.iterdir())
    inside_before = sorted(p.name for p in byte.state_dir.iterdir())
    for name in BAD_NAMES:
        for field in ("save_state", "state"):
            with pytest.raises(openai.BadRequestError) as info:
                byte.client.completions.create(
                    model=BYTE_MODEL, prompt="hi", max_tokens=2, extra_body={field: name}
                )
            _check_error(info.value, 400, field)
    # a symlink inside the directory that points outside is refused too
    target = tmp_path / "outside.safetensors"
    (byte.state_dir / "link.safetensors").symlink_to(target)
    try:
        with pytest.raises(openai.BadRequestError):
            byte.client.completions.create(
                model=BYTE_MODEL, prompt="hi", max_tokens=2, extra_body={"save_state": "link"}
            )
        assert not target.exists()
    finally:
        (byte.state_dir / "link.safetensors").unlink()
    assert sorted(p.name for p in parent.iterdir()) == outside_before
    assert sorted(p.name for p in byte.state_dir.iterdir()) == inside_before
    assert not Path("/etc/passwd.safetensors").exists()


def test_missing_foreign_and_disabled_state_files(byte, world):
    with pytest.raises(openai.NotFoundError) as info:
        byte.client.completions.create(
            model=BYTE_MODEL, prompt="hi", max_tokens=2, extra_body={"state": "nope"}
        )
    _check_error(info.value, 404, "state")

    other_sd = random_state_dict("7", n_layer=2, n_embd=64, vocab_size=256, seed=99)  # same shapes
    other = model_from_state_dict(other_sd)
    _, state = prefill(other, [1, 2, 3])
    save_state(state, byte.state_dir / "foreign.safetensors", other)
    with pytest.raises(openai.BadRequestError) as info:
        byte.client.completions.create(
            model=BYTE_MODEL, prompt="hi", max_tokens=2, extra_body={"state": "foreign"}
        )
    error = _check_error(info.value, 400, "state")
    assert "another model" in error["message"] and str(byte.state_dir) not in error["message"]

    (byte.state_dir / "junk.safetensors").write_bytes(b"not a state file at all")
    with pytest.raises(openai.BadRequestError):
        byte.client.completions.create(
            model=BYTE_MODEL, prompt="hi", max_tokens=2, extra_body={"state": "junk"}
        )

    for field in ("state", "save_state"):
        with pytest.raises(openai.BadRequestError) as info:
            world.client.completions.create(
                model=WORLD_MODEL, prompt="hi", max_tokens=2, extra_body={field: "x"}
            )
        assert "state files are disabled" in _check_error(info.value, 400, field)["message"]


# ---------------------------------------------------------------------------------------------- failures


def test_unexpected_errors_are_a_generic_500_and_the_server_survives(byte, monkeypatch):
    def broken_submit(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(byte.engine, "submit_group", broken_submit)
    with pytest.raises(openai.InternalServerError) as info:
        byte.client.completions.create(model=BYTE_MODEL, prompt="hi", max_tokens=2)
    error = _check_error(info.value, 500)
    assert "secret" not in error["message"] and error["type"] == "server_error"
    monkeypatch.undo()

    def broken_forward(*args, **kwargs):  # the model fails while the request runs
        raise RuntimeError("device exploded")

    monkeypatch.setattr(byte.engine.model, "forward", broken_forward)
    with pytest.raises(openai.InternalServerError) as info:
        byte.client.completions.create(model=BYTE_MODEL, prompt="hi", max_tokens=2)
    assert "exploded" not in _check_error(info.value, 500)["message"]
    body = {"model": BYTE_MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    with byte.http.stream("POST", "/v1/completions", json=body) as r:
        events = _sse_events(r.read())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "exploded" not in error["message"]
    monkeypatch.undo()

    r = byte.client.completions.create(model=BYTE_MODEL, prompt="hi", max_tokens=4, temperature=0)
    assert r.choices[0].text == _greedy(byte, "hi", 4).text
    assert byte.wait_idle()["running"] == 0


def test_serve_command_line(tmp_path, capsys):
    assert main(["serve", "--help"]) == 0
    assert "--max-tokens-limit" in capsys.readouterr().out
    assert main(["serve", "--model", str(tmp_path / "missing.pth")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["serve", "--model", "x.pth", "--port", "70000"]) == 2
