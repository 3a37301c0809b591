"""Tools and structured output on ``/v1/chat/completions``.

A random model never chooses to call a tool, so ``auto`` mode is checked where its logic lives: the
reader that splits calls from text (every split point of a made-up reply, against a regex split) and the
chat render over made-up events. ``required`` / named calls and ``response_format`` are decoded under a
grammar, so the random model's output must parse and match the schema: checked end to end with the
official client, raw SSE, n = 2, and LangChain's ChatOpenAI with a bound tool. Validation of outputs
uses a small checker written here (not the grammar library).
"""

from __future__ import annotations

import json
import re

import pytest
from checkpoints import random_state_dict
from test_server import _serve, _sse_events

from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.server.protocol import ChatMessage
from rwkvkit.infer.server.serving_chat import ChatRender, build_chat_prompt
from rwkvkit.infer.server.tools import Tool, ToolCallReader
from rwkvkit.tokenizer import load_tokenizer

MODEL = "world-tools"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days", "metric"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def matches(value, schema: dict) -> bool:
    """The schema features used here: object (required, no extra keys), enum, integer range, boolean,
    string maxLength, array of items with maxItems."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return (
            isinstance(value, dict)
            and set(schema["required"]) <= set(value)
            and set(value) <= set(props)
            and all(matches(value[k], props[k]) for k in value)
        )
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema["minimum"] <= value <= schema["maximum"]
        )
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema["maxItems"]
            and all(matches(v, schema["items"]) for v in value)
        )
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def srv():
    sd = random_state_dict("7", n_layer=1, n_embd=32, head_size=16, vocab_size=65536, seed=31)
    server, served = _serve(sd, "world", None, None, 4, 8, 400, MODEL)
    yield served
    served.close()
    server.__exit__()
    served.engine.shutdown()


# ---------------------------------------------------------------------------------------------- auto mode

CALL = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
REPLY = (
    "Let me check." + CALL + " and " + '<tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_' + "x"
)


def reference_split(text: str, names: set[str]) -> tuple[str, list[tuple[str, dict]]]:
    content, calls, last = [], [], 0
    for m in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.S):
        value = json.loads(m.group(1))
        content.append(text[last : m.start()])
        if value["name"] in names:
            calls.append((value["name"], value["arguments"]))
        else:
            content.append(m.group(0))
        last = m.end()
    content.append(text[last:])
    return "".join(content), calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(REPLY)])
def test_reader_splits_calls_from_text_at_every_cut(size):
    tools = [Tool("get_time", "", TIME, {})]
    want_content, want_calls = reference_split(REPLY, {"get_time"})
    for offset in range(size):
        pieces = [REPLY[:offset]] + [REPLY[i : i + size] for i in range(offset, len(REPLY), size)]
        reader = ToolCallReader(tools)
        shown, calls = "", []
        for piece in pieces:
            text, new = reader.push(piece)
            shown, calls = shown + text, calls + new
        shown += reader.flush()
        assert shown == want_content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want_calls


def test_auto_mode_render_streams_and_answers_tool_calls():
    tokenizer = load_tokenizer("world")
    options = {"logprobs": False, "tools": ("auto", [Tool("get_time", "", TIME, {})]), "think": None}
    text = " Checking." + CALL
    render = ChatRender(MODEL, False, 1, tokenizer, options)
    chunks = [c for piece in (text[:5], text[5:30], text[30:]) for c in render.text_chunks(0, piece, [])]
    event = FinishEvent("stop", 5, 20, 0, text, [])
    chunks += render.finish_chunks(0, event)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    (call,) = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert call["index"] == 0 and call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = ChatRender(MODEL, False, 1, tokenizer, options).response([event])["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    assert whole["message"]["content"] == "Checking."
    assert json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]) == {"zone": "UTC"}


def test_world_prompt_with_tools_calls_and_results():
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Time?"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[{"id": "c1", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}],
        ),
        ChatMessage(role="tool", content="12:00", tool_call_id="c1", name="get_time"),
    ]
    tools = [Tool("get_time", "Clock", TIME, {})]
    spec = json.dumps({"name": "get_time", "description": "Clock", "parameters": TIME})
    expected = (
        "System: Be brief.\nYou can call these functions. To call one, answer with\n"
        '<tool_call>{"name": "NAME", "arguments": {...}}</tool_call>\n'
        "(one block per call, nothing else in the block). The functions, as JSON:\n"
        + spec
        + "\n\nUser: Time?\n\nAssistant: "
        + '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
        + "\n\nTool: (get_time, c1) 12:00\n\nAssistant:"
    )
    assert build_chat_prompt(messages, tools=tools) == expected


# ------------------------------------------------------------------------------------ constrained calls


def _calls(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_required_and_named_tool_calls_match_their_schemas(srv):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = srv.client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="required", max_tokens=300, seed=1, n=2
    )
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        ((name, args),) = _calls(choice)
        assert matches(args, schemas[name]), args
        assert choice.message.content is None
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = srv.client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice=named, max_tokens=300, seed=2
    )
    ((name, args),) = _calls(out.choices[0])
    assert name == "get_weather" and matches(args, WEATHER)


def test_streamed_tool_call_deltas(srv):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Time?"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 300,
        "seed": 3,
        "stream": True,
    }
    r = srv.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    payloads = [json.loads(e) for e in _sse_events(r.content)[:-1]]
    deltas = [p["choices"][0]["delta"] for p in payloads]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert (
        len(calls) == 1 and calls[0]["function"]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    )
    assert matches(json.loads(calls[0]["function"]["arguments"]), TIME)
    assert not any(d.get("content") for d in deltas)
    assert payloads[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_langchain_chat_model_with_a_bound_tool(srv):
    from langchain_openai import ChatOpenAI  # a dev dependency (imported here: it is slow to import)

    chat = ChatOpenAI(
        base_url=srv.url + "/v1", api_key="unused", model=MODEL, max_tokens=300, seed=4, max_retries=0
    )
    bound = chat.bind_tools([TOOLS[0]], tool_choice="get_weather")
    message = bound.invoke("What's the weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and matches(call["args"], WEATHER)


# ------------------------------------------------------------------------------------ response_format


def test_json_schema_and_json_object_output(srv):
    messages = [{"role": "user", "content": "Describe a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2, 3):
        out = srv.client.chat.completions.create(
            model=MODEL, messages=messages, response_format=fmt, max_tokens=300, seed=seed
        )
        assert out.choices[0].finish_reason == "stop"
        assert matches(json.loads(out.choices[0].message.content), PERSON)
    stream = srv.client.chat.completions.create(
        model=MODEL,
        messages=messages,
        response_format={"type": "json_object"},
        max_tokens=300,
        seed=5,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict) and chunks[-1].choices[0].finish_reason == "stop"


def test_output_cut_by_max_tokens_is_length_never_complete(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    out = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], response_format=fmt, max_tokens=3, seed=1
    )
    assert out.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(out.choices[0].message.content)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frog"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_and_format_requests_are_400(srv, change, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **change}
    r = srv.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
