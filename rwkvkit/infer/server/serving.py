"""The serving logic behind the routes: one path from a request body to the engine and back.

:class:`ServerContext` holds what every endpoint of one server shares (engine, model name, limits, state
files, counters, event bridges). :class:`Serving` is the base of the endpoints: request checks, the
sampling parameters of a body, submitting to the engine, waiting and streaming. :class:`GenerationServing`
is the one generation path (checks, submit, then a streamed or a whole answer, shaped by a
:class:`Render`) that completions and chat (``serving_completion``, ``serving_chat``) fill in with their
prompt, limits and response shapes; embeddings (``serving_embedding``) run their inputs through the same
submit and wait.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_template import WORLD, ChatTemplate, WorldChatTemplate
from rwkvkit.infer.engine import Engine, EngineFull, FinishEvent, TextEvent
from rwkvkit.infer.sampling import DEFAULT_PENALTY_DECAY, SamplingParams
from rwkvkit.infer.server.bridge import SSE_DONE, SSE_HEADERS, ClientGone, EventBridges, next_event, sse
from rwkvkit.infer.server.errors import bad_request, error_body
from rwkvkit.infer.server.protocol import MAX_STOP_STRINGS, ApiError, SamplingRequest
from rwkvkit.infer.server.state_files import StateFiles
from rwkvkit.state import RWKVState

logger = logging.getLogger("rwkvkit.serve")

RETRY_AFTER_S = 1
COUNTERS = (
    "http_responses",
    "http_4xx",
    "http_5xx",
    "active_streams",
    "client_disconnects",
    "state_files_written",
    "state_files_read",
)


class ServerContext:
    """What every endpoint of one server shares."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        max_tokens_limit: int,
        state_dir: Path | None,
        chat_template: ChatTemplate | WorldChatTemplate = WORLD,
        reasoning_parser: str | None = None,
    ):
        self.engine = engine
        self.chat_template = chat_template  # how /v1/chat/completions turns messages into the prompt
        self.reasoning_parser = reasoning_parser  # None, or "think": split <think>...</think> off replies
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.created = int(time.time())
        self.started = time.monotonic()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.state_files = StateFiles(state_dir, engine.model, self.counters)
        self.bridges = EventBridges()

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError(
                404,
                f"model '{shown}' not found: this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rwkvkit"}

    def metrics(self) -> dict:
        stats = self.engine.stats()
        stats.setdefault("prefix_cache", None)
        return {"model": self.model_name, **stats, "server": dict(self.counters)}


def check_text(text: str, param: str) -> None:
    """ApiError 400 unless ``text`` can be encoded as UTF-8 (JSON can carry lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text (a lone surrogate?)", param=param) from None


def server_busy(e: EngineFull) -> ApiError:
    """The 429 of a full engine queue, with Retry-After."""
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    return ApiError(429, str(e), type="rate_limit_error", code="server_busy", headers=headers)


class _StreamRecord:
    """Bookkeeping of one streamed answer: which of its engine requests finished on their own."""

    def __init__(self) -> None:
        self.finished: set[int] = set()
        self.done = False


class Serving:
    """The base of the endpoints: request checks, sampling parameters, the engine and its events."""

    def __init__(self, context: ServerContext):
        self.context = context
        self.engine = context.engine
        self.counters = context.counters
        self.vocab_size = context.engine.model.config.vocab_size

    # ------------------------------------------------------------------------------- request checks

    def encode(self, text: str, param: str) -> list[int]:
        check_text(text, param)
        return self.engine.tokenizer.encode(text) if text else []

    def logit_bias(self, logit_bias: dict[str, float] | None) -> dict[int, float]:
        """The ``logit_bias`` field with its keys read as token ids of this model."""
        bias: dict[int, float] = {}
        for key, value in (logit_bias or {}).items():
            token = int(key) if re.fullmatch(r"-?[0-9]{1,12}", key.strip()) else None
            if token is None or not 0 <= token < self.vocab_size:
                shown = key if len(key) <= 20 else key[:20] + "..."
                raise ApiError(
                    400,
                    f"logit_bias: '{shown}' is not a token id of this model [0, {self.vocab_size})",
                    param="logit_bias",
                )
            bias[token] = float(value)
        return bias

    def sampling(self, body: SamplingRequest, choice: int = 0) -> SamplingParams:
        """The SamplingParams of a request's ``choice``-th choice (OpenAI's defaults for the fields it
        leaves out); with a seed, choice j draws from seed + j (its own stream, choice 0 as with n = 1)."""
        seed = None if body.seed is None else body.seed + choice
        if seed is not None and seed >= 2**64:
            seed -= 2**64
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=body.top_k or 0,
            min_p=0.0 if body.min_p is None else float(body.min_p),
            presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            penalty_decay=DEFAULT_PENALTY_DECAY if body.penalty_decay is None else float(body.penalty_decay),
            logit_bias=self.logit_bias(body.logit_bias),
            seed=seed,
        )
        try:
            params.check(self.vocab_size)
        except RwkvkitError as e:
            raise bad_request(e) from None
        return params

    def max_tokens(self, value: int | None, default: int, param: str = "max_tokens") -> int:
        limit = self.context.max_tokens_limit
        if value is None:
            return min(default, limit)
        if value > limit:
            raise ApiError(400, f"{param} = {value} is over this server's limit of {limit}", param=param)
        return value

    @staticmethod
    def stop_strings(stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        for s in stops:
            if not s:
                raise ApiError(400, "stop strings must not be empty", param="stop")
            check_text(s, "stop")
        return stops

    # ------------------------------------------------------------------------------- the engine

    def submit(
        self,
        tokens: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop_strings: list[str],
        state: RWKVState | None,
        queue: asyncio.Queue,
        tag: int | None = None,
        texts: bool = True,
        stop_tokens: tuple[int, ...] | None = None,
    ):
        """Queue a request on the engine; its events arrive on ``queue`` as (tag, event), carried from the
        engine thread by this event loop's bridge (TextEvents only when ``texts``)."""
        bridge = self.context.bridges.current()

        def on_event(event: TextEvent | FinishEvent) -> None:  # runs on the engine thread
            if texts or not isinstance(event, TextEvent):
                bridge.post(queue, (tag, event))

        try:
            return self.engine.submit(
                tokens,
                params,
                max_tokens=max_tokens,
                stop_tokens=stop_tokens,
                stop_strings=stop_strings,
                state=state,
                on_event=on_event,
            )
        except EngineFull as e:
            raise server_busy(e) from None
        except RwkvkitError as e:
            raise bad_request(e) from None

    def submit_choices(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        max_tokens: int,
        stop_strings: list[str],
        state: RWKVState | None,
        queue: asyncio.Queue,
        texts: bool,
        top_logprobs: int | None,
        score_prompt: int | None,
        constraint=None,
    ) -> list:
        """Queue ``len(params)`` choices of every prompt (choice j of prompt i has index i * n + j, its
        events arrive on ``queue`` tagged so); returns the engine requests in index order. If the engine
        refuses one prompt, those already queued are cancelled."""
        bridge = self.context.bridges.current()

        def callback(tag: int):
            def on_event(event: TextEvent | FinishEvent) -> None:  # runs on the engine thread
                if texts or not isinstance(event, TextEvent):
                    bridge.post(queue, (tag, event))

            return on_event

        handles: list = []
        n = len(params)
        try:
            for i, tokens in enumerate(prompts):
                handles += self.engine.submit_group(
                    tokens,
                    params,
                    max_tokens=max_tokens,
                    stop_strings=stop_strings,
                    state=state,
                    on_event=[callback(i * n + j) for j in range(n)],
                    top_logprobs=top_logprobs,
                    score_prompt=score_prompt,
                    constraint=constraint,
                )
        except (EngineFull, RwkvkitError) as e:
            for handle in handles:
                self.engine.cancel(handle)
            raise (server_busy(e) if isinstance(e, EngineFull) else bad_request(e)) from None
        return handles

    async def wait_all(self, http_request: Request, queue: asyncio.Queue, handles: list) -> list[FinishEvent]:
        """The FinishEvents of all ``handles`` in index order (cancelling them if the client goes away)."""
        finished: dict[int, FinishEvent] = {}
        try:
            while len(finished) < len(handles):
                tag, event = await next_event(http_request, queue)
                if isinstance(event, FinishEvent):
                    finished[tag] = event
        except BaseException:
            for handle in handles:
                self.engine.cancel(handle)
            raise
        return [finished[i] for i in range(len(handles))]

    async def wait_finish(self, http_request: Request, queue: asyncio.Queue, handle) -> FinishEvent:
        """Wait for the request's FinishEvent (cancelling it if the client goes away)."""
        try:
            while True:
                _, event = await next_event(http_request, queue)
                if isinstance(event, FinishEvent):
                    return event
        except BaseException:
            self.engine.cancel(handle)
            raise

    @staticmethod
    def check_finish(event: FinishEvent) -> None:
        if event.reason == "error" and event.bad_request:  # e.g. banned tokens that rule out every token
            raise ApiError(400, event.error)
        if event.reason == "error":
            logger.error("generation failed: %s", event.error)
            raise ApiError(500, "generation failed (see the server log)")
        if event.reason == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down", type="server_error")

    def client_gone(self) -> Response:
        self.counters["client_disconnects"] += 1
        return Response(status_code=499)

    # ------------------------------------------------------------------------------- streaming

    async def stream(
        self,
        record: _StreamRecord,
        handles: list,
        queue: asyncio.Queue,
        render: Render,
        save_path: Path | None,
    ) -> AsyncIterator[str]:
        """The SSE body of one streamed answer (every choice, interleaved, each chunk naming its
        ``index``). Closing it early (the client went away) cancels the unfinished engine requests."""
        self.counters["active_streams"] += 1
        try:
            for chunk in render.prelude():
                yield sse(chunk)
            finished: dict[int, FinishEvent] = {}
            while len(finished) < len(handles):
                batch = [await queue.get()]
                while not queue.empty():  # what has already arrived goes out together
                    batch.append(queue.get_nowait())
                lines, failed = self._stream_batch(batch, render, record, finished)
                for line in lines:
                    yield line
                if failed:
                    return
            record.done = True
            for line in await self._stream_end(finished, render, save_path):
                yield line
        except Exception:
            logger.exception("unexpected error while streaming")
            self.cancel_unfinished(record, handles, count=False)
            yield sse(error_body("internal server error (see the server log)", "server_error"))
            yield SSE_DONE
        finally:
            self.counters["active_streams"] -= 1
            self.cancel_unfinished(record, handles)

    def _stream_batch(
        self, batch: list[tuple], render: Render, record: _StreamRecord, finished: dict[int, FinishEvent]
    ) -> tuple[list[str], bool]:
        """The SSE lines of a batch of (index, event); consecutive texts of one choice go in one chunk.
        Returns (lines, whether the answer ended with an error)."""
        lines: list[str] = []
        texts: list[str] = []
        scored: list = []
        current: int | None = None

        def flush() -> None:
            if current is not None and (texts or scored):
                lines.extend(
                    sse(chunk) for chunk in render.text_chunks(current, "".join(texts), list(scored))
                )
            texts.clear()
            scored.clear()

        for index, event in batch:
            if isinstance(event, TextEvent) and event.prompt_logprobs is None:
                if index != current:
                    flush()
                    current = index
                texts.append(event.text)
                scored.extend(event.logprobs)
                continue
            flush()
            current = None
            if isinstance(event, TextEvent):  # the prompt's scores (echo), before its choice's text
                lines.append(sse(render.prompt_chunk(index, event.prompt_logprobs)))
                continue
            record.finished.add(index)
            try:
                self.check_finish(event)
            except ApiError as e:
                record.done = True
                lines += [sse(error_body(e.message, e.type, e.param, e.code)), SSE_DONE]
                return lines, True
            finished[index] = event
            lines.extend(sse(chunk) for chunk in render.finish_chunks(index, event))
        flush()
        return lines, False

    async def _stream_end(
        self, finished: dict[int, FinishEvent], render: Render, save_path: Path | None
    ) -> list[str]:
        """The last events of a stream: the usage chunk (if asked) after saving the state; then [DONE]."""
        events = [finished[i] for i in range(len(finished))]
        try:
            if save_path is not None:
                await self.context.state_files.save(save_path, events[0].state)
        except ApiError as e:
            return [sse(error_body(e.message, e.type, e.param, e.code)), SSE_DONE]
        lines = [sse(render.usage_chunk(events))] if render.include_usage else []
        return [*lines, SSE_DONE]

    def cancel_unfinished(self, record: _StreamRecord, handles: list, count: bool = True) -> None:
        """The client left (or the stream failed) before the end: cancel what still runs (once)."""
        if record.done:
            return
        record.done = True
        if count:
            self.counters["client_disconnects"] += 1
        for index, handle in enumerate(handles):
            if index not in record.finished:
                self.engine.cancel(handle)

    def streaming_response(
        self, record: _StreamRecord, handles: list, body: AsyncIterator[str]
    ) -> StreamingResponse:
        # The background task also covers a client that leaves before the body starts.
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(self.cancel_unfinished, record, handles),
        )


# ---------------------------------------------------------------------------------------------- generation


def usage_of(events: list[FinishEvent], n: int) -> dict:
    """The usage of an answer: each prompt's tokens once (its first choice's), every choice's tokens."""
    leaders = events[::n]
    prompt = sum(e.prompt_tokens for e in leaders)
    completion = sum(e.completion_tokens for e in events)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(e.cached_tokens for e in leaders)},
    }


class Render:
    """The response shapes of one generation request (the chunks of a stream, or the whole answer);
    choices are numbered ``index`` = prompt * n + choice."""

    object_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, include_usage: bool, n: int, count: int):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = model_name
        self.include_usage = include_usage
        self.n = n  # choices per prompt
        self.count = count  # choices in all

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def prelude(self) -> list[dict]:
        return []

    def filter_text(self, index: int, text: str) -> str:
        return text

    def text_chunk(self, index: int, text: str, logprobs: list) -> dict:
        raise NotImplementedError

    def text_chunks(self, index: int, text: str, logprobs: list) -> list[dict]:
        """The chunks for text (and the scores of its tokens) that arrived for choice ``index``."""
        text = self.filter_text(index, text)
        return [self.text_chunk(index, text, logprobs)] if text or logprobs else []

    def prompt_chunk(self, index: int, prompt_logprobs: list) -> dict:
        raise NotImplementedError

    def finish_chunk(self, index: int, event: FinishEvent) -> dict:
        raise NotImplementedError

    def finish_chunks(self, index: int, event: FinishEvent) -> list[dict]:
        """The chunks that end choice ``index``."""
        return [self.finish_chunk(index, event)]

    def usage_chunk(self, events: list[FinishEvent]) -> dict:
        return {**self.envelope(self.object_name, []), "usage": usage_of(events, self.n)}

    def response(self, events: list[FinishEvent]) -> dict:
        raise NotImplementedError


class GenerationServing(Serving):
    """The one generation path of /v1/completions and /v1/chat/completions: the subclass gives the
    prompts, the checks of its own fields, the token limit, the stop strings, the log-probabilities
    asked for and the response shapes."""

    max_choices = 16  # n at most (and at most the engine's batch)

    def check_fields(self, body) -> None:
        """Refuse the fields this endpoint does not support."""

    def prompts(self, body) -> list[list[int]]:
        raise NotImplementedError

    def logprob_settings(self, body) -> tuple[int | None, int | None]:
        """(top_logprobs of generated tokens, or None; top alternatives of scored prompt tokens, or None)."""
        return None, None

    def request_max_tokens(self, body) -> int:
        raise NotImplementedError

    def request_constraint(self, body):
        """A factory of grammar matchers that constrain every choice (structured output), or None."""
        return None

    def request_stops(self, body) -> list[str]:
        return self.stop_strings(body.stop)

    def render(self, body, prompts: list[list[int]]) -> Render:
        raise NotImplementedError

    def choices(self, body) -> int:
        n = 1 if body.n is None else body.n
        limit = min(self.max_choices, self.engine.max_batch)
        if not 1 <= n <= limit:
            raise ApiError(400, f"n = {n} is out of range: this server gives 1 to {limit} choices", param="n")
        return n

    async def create(self, body, http_request: Request) -> Response:
        """Answer one request: checked in the order of its fields' meaning, then run on the engine and
        answered as a stream (``stream``) or as one JSON object."""
        self.context.check_model(body.model)
        self.check_fields(body)
        prompts = self.prompts(body)
        n = self.choices(body)
        params = [self.sampling(body, j) for j in range(n)]
        top_logprobs, score_prompt = self.logprob_settings(body)
        max_tokens = self.request_max_tokens(body)
        stops = self.request_stops(body)
        state_files = self.context.state_files
        save_path = state_files.path(body.save_state, "save_state") if body.save_state is not None else None
        if save_path is not None and len(prompts) * n > 1:
            raise ApiError(400, "save_state needs a single choice (n = 1, one prompt)", param="save_state")
        state = await state_files.load(body.state)

        queue: asyncio.Queue = asyncio.Queue()
        stream = bool(body.stream)
        constraint = self.request_constraint(body)
        handles = self.submit_choices(
            prompts, params, max_tokens, stops, state, queue, stream, top_logprobs, score_prompt, constraint
        )
        render = self.render(body, prompts)
        if stream:
            record = _StreamRecord()
            return self.streaming_response(
                record, handles, self.stream(record, handles, queue, render, save_path)
            )
        try:
            events = await self.wait_all(http_request, queue, handles)
        except ClientGone:
            return self.client_gone()
        for event in events:
            self.check_finish(event)
        if save_path is not None:
            await state_files.save(save_path, events[0].state)
        return JSONResponse(render.response(events))


def wants_usage(body: SamplingRequest) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)
