"""``POST /v1/chat/completions`` on the shared serving path: messages become the World chat prompt
(:mod:`rwkvkit.infer.chat_format`), the reply comes back as an assistant message."""

from __future__ import annotations

from rwkvkit.infer.chat_format import STOP_STRING, format_conversation
from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.server.logprob_format import chat_logprobs
from rwkvkit.infer.server.protocol import ApiError, ChatCompletionRequest, ChatMessage
from rwkvkit.infer.server.serving import GenerationServing, Render, check_text, usage_of, wants_usage


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

    def __init__(self, model_name: str, include_usage: bool, n: int, count: int, tokenizer, logprobs: bool):
        super().__init__(model_name, include_usage, n, count)
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self._leading_space = [_LeadingSpace() for _ in range(count)]

    def filter_text(self, index: int, text: str) -> str:
        return self._leading_space[index](text)

    def chunk(self, index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return self.envelope(self.object_name, [choice])

    def prelude(self) -> list[dict]:
        return [self.chunk(i, {"role": "assistant"}, None) for i in range(self.count)]

    def text_chunk(self, index: int, text: str, logprobs: list) -> dict:
        formatted = chat_logprobs(self.tokenizer, logprobs) if self.logprobs else None
        return self.chunk(index, {"content": text} if text else {}, None, formatted)

    def finish_chunk(self, index: int, event: FinishEvent) -> dict:
        return self.chunk(index, {}, event.reason)

    def response(self, events: list[FinishEvent]) -> dict:
        choices = []
        for index, event in enumerate(events):
            message = {"role": "assistant", "content": _LeadingSpace()(event.text)}
            logprobs = chat_logprobs(self.tokenizer, event.logprobs or []) if self.logprobs else None
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": event.reason}
            )
        return {**self.envelope("chat.completion", choices), "usage": usage_of(events, self.n)}


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


def build_chat_prompt(messages: list[ChatMessage]) -> str:
    """The World chat prompt of the messages (:func:`rwkvkit.infer.chat_format.format_conversation`)."""
    turns = []
    for i, message in enumerate(messages):
        text = message_text(message, i)
        check_text(text, "messages")
        turns.append((message.role, text))
    return format_conversation(turns)


class ChatServing(GenerationServing):
    """``POST /v1/chat/completions``: messages become the World chat prompt; generation always stops at
    the next user turn (plus the client's stops) and the reply loses the space after ``Assistant:``."""

    def check_fields(self, body: ChatCompletionRequest) -> None:
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def prompts(self, body: ChatCompletionRequest) -> list[list[int]]:
        return [self.encode(build_chat_prompt(body.messages), "messages")]

    def logprob_settings(self, body: ChatCompletionRequest) -> tuple[int | None, int | None]:
        return ((body.top_logprobs or 0) if body.logprobs else None), None

    def request_max_tokens(self, body: ChatCompletionRequest) -> int:
        if body.max_completion_tokens is not None:
            return self.max_tokens(body.max_completion_tokens, 0, "max_completion_tokens")
        return self.max_tokens(body.max_tokens, self.context.max_tokens_limit)

    def request_stops(self, body: ChatCompletionRequest) -> list[str]:
        return [STOP_STRING, *self.stop_strings(body.stop)]

    def render(self, body: ChatCompletionRequest, prompts: list[list[int]]) -> Render:
        n = self.choices(body)
        tokenizer = self.engine.tokenizer
        return ChatRender(self.context.model_name, wants_usage(body), n, n, tokenizer, bool(body.logprobs))
