"""The server's log-probabilities, echo, batched prompts and n > 1, checked against the model run here.

Expected values come from a separate copy of the weights: one full forward pass over the tokens and a
float64 log-softmax, never from the server's own earlier answers. Sampled choices are checked against
``n = 1`` requests with the seeds each choice is documented to use (seed + j).
"""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch
from checkpoints import random_state_dict
from test_server import KEY, _serve, _sse_events

MODEL = "byte-lp"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    sd = random_state_dict("7", n_layer=2, n_embd=64, vocab_size=256, seed=21)
    state_dir = tmp_path_factory.mktemp("lp") / "states"
    server, served = _serve(sd, "byte", KEY, state_dir, 8, 16, 512, MODEL)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


def reference_logprobs(served, tokens: list[int]) -> torch.Tensor:
    """log-softmax after every position of ``tokens`` (T, V), float64, from one forward pass."""
    with torch.no_grad():
        logits, _ = served.ref(torch.tensor([tokens]))
    return torch.log_softmax(logits[0].double(), dim=-1)


def shown(served, token: int) -> str:
    """How the API shows a token (documented): its text, or ``bytes:\\xNN...`` for a partial character."""
    raw = served.tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def post(served, path: str, body: dict) -> dict:
    r = served.http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_scores_the_prompt_with_max_tokens_zero(srv):
    tokens = srv.tokenizer.encode("To be, or not to be: that is the question.")
    body = {"model": MODEL, "prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": 3, "temperature": 0}
    choice = post(srv, "/v1/completions", body)["choices"][0]
    assert choice["text"] == srv.tokenizer.decode(tokens)
    assert choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    ref = reference_logprobs(srv, tokens)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(tokens)
    for i in range(1, len(tokens)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, tokens[i]]), abs=1e-4)
        best = torch.topk(ref[i - 1], 3)
        expected = {shown(srv, int(t)): float(v) for v, t in zip(best.values, best.indices, strict=True)}
        got = lp["top_logprobs"][i]
        for text, value in expected.items():  # the 3 best, plus the chosen token when it is not one
            assert got[text] == pytest.approx(value, abs=1e-4)
        assert len(got) in (3, 4)
    assert lp["tokens"] == [srv.tokenizer.decode([t]) for t in tokens]
    assert lp["text_offset"] == list(range(len(tokens)))  # one ASCII character per byte token


def test_generated_logprobs_and_lm_eval_style_scoring(srv):
    """Greedy tokens are the argmax: their logprob equals the top alternative's (lm-eval's is_greedy)."""
    prompt = srv.tokenizer.encode("Once upon a time")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "logprobs": 1, "temperature": 0, "echo": True}
    choice = post(srv, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    tokens = list(prompt)
    for _ in range(6):  # greedy decoding with the reference copy (the byte model has no stop token hit here)
        tokens.append(int(reference_logprobs(srv, tokens)[-1].argmax()))
    ref = reference_logprobs(srv, tokens)
    assert lp["tokens"] == [shown(srv, t) for t in tokens]
    assert len(lp["token_logprobs"]) == len(tokens)
    for i in range(1, len(tokens)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, tokens[i]]), abs=1e-4)
    for i in range(len(prompt), len(tokens)):
        assert tokens[i] == int(ref[i - 1].argmax())
        assert lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())


def test_batched_prompts_answer_in_order(srv):
    texts = ["alpha", "a much longer second prompt", "c"]
    prompts = [srv.tokenizer.encode(t) for t in texts]
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "logprobs": 0, "echo": True}
    batch = post(srv, "/v1/completions", {**body, "prompt": texts})
    ids = post(srv, "/v1/completions", {**body, "prompt": prompts})
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    for i, text in enumerate(texts):
        alone = post(srv, "/v1/completions", {**body, "prompt": text})["choices"][0]
        assert batch["choices"][i]["text"] == alone["text"] == ids["choices"][i]["text"]
        assert batch["choices"][i]["logprobs"] == alone["logprobs"]
    assert batch["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_n_choices_fork_one_prefill_with_their_own_seeds(srv):
    prompt = "The king said"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    before = srv.metrics()["prompt_tokens"]
    many = post(srv, "/v1/completions", {**body, "n": 3})
    assert srv.metrics()["prompt_tokens"] - before == len(srv.tokenizer.encode(prompt))  # read once
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for j in range(3):
        alone = post(srv, "/v1/completions", {**body, "seed": 1234 + j})["choices"][0]
        assert many["choices"][j]["text"] == alone["text"]
    assert len({c["text"] for c in many["choices"]}) > 1
    usage = many["usage"]
    assert usage["prompt_tokens"] == len(srv.tokenizer.encode(prompt))
    assert usage["completion_tokens"] == 36  # 3 x 12 (the byte model has no end-of-text stop here)


def test_streamed_choices_interleave_and_match_the_whole_answer(srv):
    body = {
        "model": MODEL,
        "prompt": ["first prompt", "second"],
        "max_tokens": 10,
        "temperature": 0.8,
        "seed": 7,
        "n": 2,
        "logprobs": 2,
        "echo": True,
    }
    whole = post(srv, "/v1/completions", body)
    r = srv.http.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    events = _sse_events(r.content)
    assert events[-1] == "[DONE]"
    texts = {i: "" for i in range(4)}
    logprobs = {i: [] for i in range(4)}
    finished = {}
    for raw in events[:-1]:
        (choice,) = json.loads(raw)["choices"]
        i = choice["index"]
        texts[i] += choice["text"]
        if choice["logprobs"] is not None:
            logprobs[i] += choice["logprobs"]["token_logprobs"]
        if choice["finish_reason"] is not None:
            finished[i] = choice["finish_reason"]
    assert sorted(finished) == [0, 1, 2, 3]
    for i, choice in enumerate(whole["choices"]):
        assert texts[i] == choice["text"]
        assert logprobs[i] == choice["logprobs"]["token_logprobs"]


def test_chat_logprobs(srv):
    messages = [{"role": "user", "content": "Say something."}]
    out = srv.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the best token
        assert len(item.bytes) == 1 and shown(srv, item.bytes[0]) == item.token  # byte model: id = byte
    assert all(math.isfinite(item.logprob) and item.logprob <= 0 for item in content)
    streamed = srv.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True
    )
    choices = [c for chunk in streamed for c in chunk.choices if c.logprobs]
    values = [t.logprob for c in choices for t in c.logprobs.content]
    assert values == pytest.approx([item.logprob for item in content])


def test_chat_n_choices(srv):
    out = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2, seed=5
    )
    assert [c.index for c in out.choices] == [0, 1]
    one = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=6
    )
    assert out.choices[1].message.content == one.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 9}, "n"),  # over this server's --max-batch of 8
        ({"prompt": "x", "n": 2, "save_state": "a.pt"}, "save_state"),
        ({"prompt": [[1, 2], [3, 999]]}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(srv, body, param):
    r = srv.http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_chat_top_logprobs_needs_logprobs(srv):
    with pytest.raises(openai.BadRequestError) as info:
        srv.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, top_logprobs=2
        )
    assert info.value.body["param"] == "top_logprobs"
