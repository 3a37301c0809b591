"""``POST /v1/completions`` on the shared serving path: one prompt (a string or token ids), text back."""

from __future__ import annotations

from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.server.protocol import ApiError, CompletionRequest
from rwkvkit.infer.server.serving import GenerationServing, Render, usage, wants_usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's API


class CompletionRender(Render):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self.envelope(self.object_name, [choice])

    def text_chunk(self, text: str) -> dict:
        return self.chunk(text, None)

    def finish_chunk(self, event: FinishEvent) -> dict:
        return self.chunk("", event.reason)

    def response(self, event: FinishEvent) -> dict:
        return {**self.chunk(event.text, event.reason), "usage": usage(event)}


class CompletionServing(GenerationServing):
    """``POST /v1/completions``: one prompt (a string or token ids), text back."""

    def check_fields(self, body: CompletionRequest) -> None:
        if body.logprobs is not None:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported (only 1)", param="best_of")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")

    def prompt_tokens(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, str):
            tokens = self.encode(prompt, "prompt")
        elif all(isinstance(t, int) for t in prompt):
            tokens = list(prompt)
        else:
            raise ApiError(
                400,
                "'prompt' must be one string or one list of token ids: arrays of prompts are not "
                "supported (send one request per prompt)",
                param="prompt",
            )
        if not tokens:
            raise ApiError(400, "empty prompt: at least one token is needed", param="prompt")
        return tokens

    def request_max_tokens(self, body: CompletionRequest) -> int:
        return self.max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)

    def render(self, body: CompletionRequest) -> Render:
        return CompletionRender(self.context.model_name, wants_usage(body))
