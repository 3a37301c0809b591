"""``POST /v1/completions`` on the shared serving path: prompts (strings or token ids, one or a batch) in,
text back, with ``n`` choices each, log-probabilities (``logprobs``) and the prompt echoed (``echo``, its
tokens scored when ``logprobs`` is set; ``max_tokens: 0`` for scoring alone)."""

from __future__ import annotations

from rwkvkit.infer.engine import FinishEvent
from rwkvkit.infer.server.logprob_format import CompletionLogprobs
from rwkvkit.infer.server.protocol import ApiError, CompletionRequest
from rwkvkit.infer.server.serving import GenerationServing, Render, usage_of, wants_usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's API
MAX_PROMPTS = 64  # prompts in one request


class CompletionRender(Render):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(
        self, model_name: str, include_usage: bool, n: int, prompts: list[list[int]], tokenizer, body
    ):
        super().__init__(model_name, include_usage, n, len(prompts) * n)
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.echo = bool(body.echo)
        self.logprobs = body.logprobs is not None
        self.prompt_texts = [tokenizer.decode(p) for p in prompts] if self.echo else []
        self._formats = [CompletionLogprobs(tokenizer) for _ in range(self.count)]  # streaming offsets

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        return self.envelope(self.object_name, [choice])

    def prelude(self) -> list[dict]:
        if not self.echo or self.logprobs:  # with logprobs the echo comes with its scores (prompt_chunk)
            return []
        return [self.chunk(i, self.prompt_texts[i // self.n], None, None) for i in range(self.count)]

    def prompt_chunk(self, index: int, prompt_logprobs: list) -> dict:
        tokens = self.prompts[index // self.n]
        logprobs = self._formats[index].format(tokens, prompt_logprobs)
        return self.chunk(index, self.prompt_texts[index // self.n], None, logprobs)

    def text_chunk(self, index: int, text: str, logprobs: list) -> dict:
        formatted = None
        if self.logprobs:
            formatted = self._formats[index].format([e.token for e in logprobs], logprobs)
        return self.chunk(index, text, None, formatted)

    def finish_chunk(self, index: int, event: FinishEvent) -> dict:
        return self.chunk(index, "", event.reason, None)

    def response(self, events: list[FinishEvent]) -> dict:
        choices = []
        for index, event in enumerate(events):
            prompt = self.prompts[index // self.n]
            text = (self.prompt_texts[index // self.n] if self.echo else "") + event.text
            logprobs = None
            if self.logprobs:
                fmt = CompletionLogprobs(self.tokenizer)
                parts = [fmt.format(prompt, event.prompt_logprobs)] if self.echo else []
                generated = event.logprobs or []
                parts.append(fmt.format([e.token for e in generated], generated))
                logprobs = fmt.merge(parts)
            choices.append(
                {"index": index, "text": text, "finish_reason": event.reason, "logprobs": logprobs}
            )
        return {**self.envelope(self.object_name, choices), "usage": usage_of(events, self.n)}


class CompletionServing(GenerationServing):
    """``POST /v1/completions``: prompts (strings or token ids, one or a batch), text back."""

    def check_fields(self, body: CompletionRequest) -> None:
        if body.best_of not in (None, 1):
            raise ApiError(
                400, "best_of is not supported (only 1; use n for several choices)", param="best_of"
            )
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [self.encode(prompt, "prompt")]
        elif all(isinstance(t, int) for t in prompt) and prompt:
            prompts = [list(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p, "prompt") for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        if not prompts:
            raise ApiError(400, "empty prompt list: at least one prompt is needed", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(
                400, f"{len(prompts)} prompts: at most {MAX_PROMPTS} in one request", param="prompt"
            )
        for i, tokens in enumerate(prompts):
            where = "" if len(prompts) == 1 else f" (prompt {i})"
            if not tokens:
                raise ApiError(400, f"empty prompt{where}: at least one token is needed", param="prompt")
            bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400,
                    f"prompt token id {bad}{where} is outside the vocabulary [0, {self.vocab_size})",
                    param="prompt",
                )
        return prompts

    def logprob_settings(self, body: CompletionRequest) -> tuple[int | None, int | None]:
        top = body.logprobs
        return top, (top if body.echo and top is not None else None)

    def request_max_tokens(self, body: CompletionRequest) -> int:
        return self.max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)

    def render(self, body: CompletionRequest, prompts: list[list[int]]) -> Render:
        n = self.choices(body)
        return CompletionRender(
            self.context.model_name, wants_usage(body), n, prompts, self.engine.tokenizer, body
        )
