"""``POST /v1/chat/completions`` on the shared serving path: messages become the prompt of the server's
chat template (:mod:`rwkvkit.infer.chat_template`; the World chat format by default), the reply comes back
as an assistant message (split into ``reasoning_content`` and ``content`` with ``--reasoning-parser
think``, :mod:`rwkvkit.infer.reasoning`)."""

from __future__ import annotations

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_template import WORLD, ChatTemplate, WorldChatTemplate
from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.reasoning import ThinkSplitter, prompt_opens_think, split_reasoning
from rwkvkit.infer.server.errors import bad_request
from rwkvkit.infer.server.protocol import ApiError, ChatCompletionRequest, ChatMessage
from rwkvkit.infer.server.serving import GenerationServing, Render, check_text, usage, wants_usage


class _LeadingSpace:
    """Drops the one space that starts a chat reply (the model writes ``Assistant: text``)."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, text: str) -> str:
        if self.first and text:
            self.first = False
            return text[1:] if text.startswith(" ") else text
        return text


class ChatRender(Render):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model_name: str, include_usage: bool, reasoning: ThinkSplitter | None = None):
        super().__init__(model_name, include_usage)
        self._leading_space = _LeadingSpace()
        self._reasoning = reasoning  # with --reasoning-parser: splits the streamed reply
        self._delta: dict = {}  # the delta of the text filter_text passed last (reasoning split only)

    def filter_text(self, text: str) -> str:
        text = self._leading_space(text)
        if self._reasoning is None:
            return text
        self._delta = _reasoning_delta(*self._reasoning.push(text))
        return "".join(self._delta.values())

    def chunk(self, delta: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.object_name, [choice])

    def prelude(self) -> list[dict]:
        return [self.chunk({"role": "assistant"}, None)]

    def text_chunk(self, text: str) -> dict:
        return self.chunk(self._delta if self._reasoning is not None else {"content": text}, None)

    def finish_chunk(self, event: FinishEvent) -> dict:
        # the reasoning split may still hold back the end of the text (a part of a tag, whitespace)
        delta = _reasoning_delta(*self._reasoning.flush()) if self._reasoning is not None else {}
        return self.chunk(delta, event.reason)

    def response(self, event: FinishEvent) -> dict:
        message = {"role": "assistant", "content": _LeadingSpace()(event.text)}
        if self._reasoning is not None:
            reasoning, content = split_reasoning(message["content"], self._reasoning.inside)
            message.update(content=content, reasoning_content=reasoning)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": event.reason}
        return {**self.envelope("chat.completion", [choice]), "usage": usage(event)}


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


def _reasoning_delta(reasoning: str, content: str) -> dict:
    """The stream delta of a piece of a split reply (reasoning first; a key only for a non-empty text)."""
    delta = {"reasoning_content": reasoning} if reasoning else {}
    return {**delta, "content": content} if content else delta


def build_chat_prompt(
    messages: list[ChatMessage],
    template: ChatTemplate | WorldChatTemplate = WORLD,
    tools: list[dict] | None = None,
) -> str:
    """The prompt of the messages in ``template`` (by default the World chat format,
    :func:`rwkvkit.infer.chat_format.format_conversation`); ApiError 400 when the template fails on them."""
    turns = []
    for i, message in enumerate(messages):
        text = message_text(message, i)
        check_text(text, "messages")
        turn = {"role": message.role, "content": text}
        turns.append(turn if message.name is None else {**turn, "name": message.name})
    try:
        return template.render(turns, add_generation_prompt=True, tools=tools)
    except RwkvkitError as e:
        raise bad_request(e) from None


class ChatServing(GenerationServing):
    """``POST /v1/chat/completions``: messages become the prompt of the chat template (the World chat
    prompt by default); generation always stops at the template's stop strings (``\\n\\nUser:`` for World)
    plus the client's, and the reply loses the one space that starts it (``Assistant: text``)."""

    def check_fields(self, body: ChatCompletionRequest) -> None:
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    def prompt(self, body: ChatCompletionRequest) -> str:
        return build_chat_prompt(body.messages, self.context.chat_template, body.tools)

    def prompt_tokens(self, body: ChatCompletionRequest) -> list[int]:
        return self.encode(self.prompt(body), "messages")

    def request_max_tokens(self, body: ChatCompletionRequest) -> int:
        if body.max_completion_tokens is not None:
            return self.max_tokens(body.max_completion_tokens, 0, "max_completion_tokens")
        return self.max_tokens(body.max_tokens, self.context.max_tokens_limit)

    def request_stops(self, body: ChatCompletionRequest) -> list[str]:
        return [*self.context.chat_template.stop_strings, *self.stop_strings(body.stop)]

    def render(self, body: ChatCompletionRequest) -> Render:
        reasoning = None
        if self.context.reasoning_parser is not None:  # the prompt again: does it open the <think> block?
            reasoning = ThinkSplitter(inside=prompt_opens_think(self.prompt(body)))
        return ChatRender(self.context.model_name, wants_usage(body), reasoning)
