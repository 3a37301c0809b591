"""``POST /v1/chat/completions`` on the shared serving path: messages become the prompt of the server's
chat template (:mod:`rwkvkit.infer.chat_template`; the World chat format by default), the reply comes back
as an assistant message: its text (split into ``reasoning_content`` and ``content`` with
``--reasoning-parser think``, :mod:`rwkvkit.infer.reasoning`), its tool calls (:mod:`.tools`), or JSON
decoded under a schema (``response_format``, :mod:`rwkvkit.infer.constrained`)."""

from __future__ import annotations

import json

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_template import WORLD, ChatTemplate, WorldChatTemplate
from rwkvkit.infer.constrained import compile_json_constraint
from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.reasoning import ThinkSplitter, prompt_opens_think, split_reasoning
from rwkvkit.infer.server.errors import bad_request
from rwkvkit.infer.server.logprob_format import chat_logprobs
from rwkvkit.infer.server.protocol import ApiError, ChatCompletionRequest, ChatMessage
from rwkvkit.infer.server.serving import GenerationServing, Render, check_text, usage_of, wants_usage
from rwkvkit.infer.server.tools import (
    CLOSE_TAG,
    Tool,
    ToolCallReader,
    call_block,
    call_schema,
    chosen_tools,
    parse_tools,
    read_call,
    tools_system_text,
)


class _LeadingSpace:
    """Drops the one space that starts a chat reply (the model writes ``Assistant: text``)."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, text: str) -> str:
        if self.first and text:
            self.first = False
            return text[1:] if text.startswith(" ") else text
        return text


class _Reply:
    """One choice's reply on its way out: the leading space dropped, the reasoning split off (with a
    reasoning parser) and, with tools, the calls (``auto``: :class:`~.tools.ToolCallReader`;
    ``required``: the whole reply is one call's JSON)."""

    def __init__(self, mode: str, tools: list[Tool], reasoning: ThinkSplitter | None):
        self.space = _LeadingSpace()
        self.mode = mode
        self.reader = ToolCallReader(tools) if mode == "auto" else None
        self.reasoning = reasoning if mode != "required" else None
        self.held: list[str] = []
        self.calls: list[dict] = []

    def push(self, text: str) -> tuple[str, str, list[dict]]:
        """(reasoning, content, calls) that ``text`` makes certain."""
        text = self.space(text)
        if self.mode == "required":
            self.held.append(text)
            return "", "", []
        reasoning, content = self.reasoning.push(text) if self.reasoning is not None else ("", text)
        return (reasoning, *self._content(content))

    def _content(self, content: str) -> tuple[str, list[dict]]:
        if self.reader is None or not content:
            return content, []
        content, calls = self.reader.push(content)
        self.calls += calls
        return content, calls

    def finish(self, event: FinishEvent) -> tuple[str, str, list[dict], str]:
        """(reasoning, content still to show, calls completed now, finish_reason)."""
        if self.mode == "required":
            text = "".join(self.held)
            call = read_call(text) if event.reason == "stop" else None
            if call is not None:
                self.calls.append(call)
                return "", "", [call], "tool_calls"
            return "", text, [], event.reason
        reasoning, content = self.reasoning.flush() if self.reasoning is not None else ("", "")
        content, calls = self._content(content + (CLOSE_TAG if event.stop == CLOSE_TAG else ""))
        if self.reader is not None:
            content += self.reader.flush()
        return reasoning, content, calls, ("tool_calls" if self.calls else event.reason)


class ChatRender(Render):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model_name: str, include_usage: bool, n: int, tokenizer, options: dict):
        super().__init__(model_name, include_usage, n, n)
        self.tokenizer = tokenizer
        self.logprobs = options["logprobs"]
        self.mode, self.tools = options["tools"]  # the tool mode and the tools that may be called
        self.think = options["think"]  # None: no reasoning parser; else whether the prompt opened <think>
        self._replies = [self._reply() for _ in range(n)]

    def _reply(self) -> _Reply:
        splitter = ThinkSplitter(inside=self.think) if self.think is not None else None
        return _Reply(self.mode, self.tools, splitter)

    def chunk(self, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self.envelope(self.object_name, [choice])

    def prelude(self) -> list[dict]:
        return [self.chunk(i, {"role": "assistant"}, None) for i in range(self.count)]

    def _deltas(
        self, index: int, reasoning: str, content: str, calls: list[dict], logprobs: list
    ) -> list[dict]:
        out = []
        if reasoning or content or logprobs:
            delta = {"reasoning_content": reasoning} if reasoning else {}
            delta = {**delta, "content": content} if content else delta
            formatted = chat_logprobs(self.tokenizer, logprobs) if self.logprobs else None
            out.append(self.chunk(index, delta, None, formatted))
        if calls:
            first = len(self._replies[index].calls) - len(calls)
            deltas = [{"index": first + k, **call} for k, call in enumerate(calls)]
            out.append(self.chunk(index, {"tool_calls": deltas}, None))
        return out

    def text_chunks(self, index: int, text: str, logprobs: list) -> list[dict]:
        return self._deltas(index, *self._replies[index].push(text), logprobs)

    def finish_chunks(self, index: int, event: FinishEvent) -> list[dict]:
        reasoning, content, calls, reason = self._replies[index].finish(event)
        return [*self._deltas(index, reasoning, content, calls, []), self.chunk(index, {}, reason)]

    def response(self, events: list[FinishEvent]) -> dict:
        choices = [self._whole(index, event) for index, event in enumerate(events)]
        return {**self.envelope("chat.completion", choices), "usage": usage_of(events, self.n)}

    def _whole(self, index: int, event: FinishEvent) -> dict:
        reply = _Reply(self.mode, self.tools, None)
        text = _LeadingSpace()(event.text)
        reasoning = None
        if self.think is not None and self.mode != "required":
            reasoning, text = split_reasoning(text, self.think)
            text = text or ""
        reply.space.first = False  # the space is gone already
        _, content, _ = reply.push(text)
        _, tail, _, reason = reply.finish(event)
        content += tail
        message: dict = {"role": "assistant", "content": content if content or not reply.calls else None}
        if self.think is not None:
            message["content"] = content or None
            message["reasoning_content"] = reasoning
        if reply.calls:
            message["tool_calls"] = reply.calls
        logprobs = chat_logprobs(self.tokenizer, event.logprobs or []) if self.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a chat message: its content string, or its text parts joined by newlines."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"messages[{index}]: only text content parts are supported, got type '{part.type}'",
                param="messages",
            )
        pieces.append(part.text)
    return "\n".join(pieces)


def _template_turns(messages: list[ChatMessage], world: bool) -> list[dict]:
    """The messages as a template reads them: the World format gets calls as ``<tool_call>`` blocks and
    results as ``Tool:`` turns in the text; other templates get transformers' message dicts."""
    turns = []
    for i, message in enumerate(messages):
        text = message_text(message, i)
        check_text(text, "messages")
        turn: dict = {"role": message.role, "content": text}
        if message.name is not None:
            turn["name"] = message.name
        calls = message.tool_calls or []
        if world and calls:
            blocks = [call_block(c.function.name, c.function.arguments) for c in calls]
            turn["content"] = "\n".join([text, *blocks] if text else blocks)
        elif calls:
            turn["tool_calls"] = [_call_dict(c) for c in calls]
        if world and message.role == "tool":
            turn["content"] = f"({message.name or 'result'}, {message.tool_call_id or '-'}) {text}"
        elif message.tool_call_id is not None:
            turn["tool_call_id"] = message.tool_call_id
        turns.append(turn)
    return turns


def _call_dict(call) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


def build_chat_prompt(
    messages: list[ChatMessage],
    template: ChatTemplate | WorldChatTemplate = WORLD,
    tools: list[Tool] | None = None,
) -> str:
    """The prompt of the messages in ``template`` (by default the World chat format,
    :func:`rwkvkit.infer.chat_format.format_conversation`), offering ``tools`` (None: none); ApiError 400
    when the template fails on them. The World format gets the tools' text (:mod:`.tools`) in its opening
    system turn; another template gets them as its ``tools`` variable."""
    world = isinstance(template, WorldChatTemplate)
    turns = _template_turns(messages, world)
    template_tools = None
    if tools is not None and world:
        text = tools_system_text(tools)
        if turns and turns[0]["role"] in ("system", "developer"):
            turns[0] = {**turns[0], "content": turns[0]["content"] + "\n" + text}
        else:
            turns.insert(0, {"role": "system", "content": text})
    elif tools is not None:
        template_tools = [t.raw for t in tools]
    try:
        return template.render(turns, add_generation_prompt=True, tools=template_tools)
    except RwkvkitError as e:
        raise bad_request(e) from None


class ChatServing(GenerationServing):
    """``POST /v1/chat/completions``: messages become the World chat prompt; generation always stops at
    the next user turn (plus the client's stops) and the reply loses the space after ``Assistant:``.
    Tools and structured output as :mod:`.tools` and :mod:`rwkvkit.infer.constrained` describe."""

    def check_fields(self, body: ChatCompletionRequest) -> None:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        mode, _ = self.tool_plan(body)
        if mode == "required" and self.output_schema(body) is not None:
            raise ApiError(
                400, "response_format cannot be combined with a required tool call", param="response_format"
            )

    @staticmethod
    def tool_plan(body: ChatCompletionRequest) -> tuple[str, list[Tool]]:
        return chosen_tools(parse_tools(body.tools), body.tool_choice)

    @staticmethod
    def output_schema(body: ChatCompletionRequest) -> tuple[dict | None] | None:
        """(the schema, None = any JSON object) for JSON output, or None for plain text."""
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return (None,)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(
                400, "response_format json_schema needs json_schema.schema", param="response_format"
            )
        return (fmt.json_schema.schema_,)

    def prompt(self, body: ChatCompletionRequest) -> str:
        mode, tools = self.tool_plan(body)
        return build_chat_prompt(body.messages, self.context.chat_template, tools if mode != "none" else None)

    def prompts(self, body: ChatCompletionRequest) -> list[list[int]]:
        return [self.encode(self.prompt(body), "messages")]

    def logprob_settings(self, body: ChatCompletionRequest) -> tuple[int | None, int | None]:
        return ((body.top_logprobs or 0) if body.logprobs else None), None

    def request_max_tokens(self, body: ChatCompletionRequest) -> int:
        if body.max_completion_tokens is not None:
            return self.max_tokens(body.max_completion_tokens, 0, "max_completion_tokens")
        return self.max_tokens(body.max_tokens, self.context.max_tokens_limit)

    def request_stops(self, body: ChatCompletionRequest) -> list[str]:
        mode, _ = self.tool_plan(body)
        single_call = mode == "auto" and body.parallel_tool_calls is False
        template_stops = self.context.chat_template.stop_strings
        return [*template_stops, *([CLOSE_TAG] if single_call else []), *self.stop_strings(body.stop)]

    def request_constraint(self, body: ChatCompletionRequest):
        mode, tools = self.tool_plan(body)
        if mode == "required":
            schema, param = call_schema(tools), "tools"
        else:
            wanted = self.output_schema(body)
            if wanted is None:
                return None
            schema, param = wanted[0], "response_format"
        try:
            grammar = compile_json_constraint(self.engine.tokenizer, schema, vocab_size=self.vocab_size)
        except RwkvkitError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None
        return grammar.new_matcher

    def render(self, body: ChatCompletionRequest, prompts: list[list[int]]) -> Render:
        n = self.choices(body)
        tokenizer = self.engine.tokenizer
        think = None
        if self.context.reasoning_parser is not None:  # the prompt again: does it open the <think> block?
            think = prompt_opens_think(self.prompt(body))
        options = {"logprobs": bool(body.logprobs), "tools": self.tool_plan(body), "think": think}
        return ChatRender(self.context.model_name, wants_usage(body), n, tokenizer, options)
