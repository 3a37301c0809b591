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


def usage(event: FinishEvent) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }


class _StreamRecord:
    """Bookkeeping of one streamed answer: whether its engine request finished on its own."""

    def __init__(self) -> None:
        self.finished = False


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

    def sampling(self, body: SamplingRequest) -> SamplingParams:
        """The SamplingParams of a request (OpenAI's defaults for the fields it leaves out)."""
        if body.n not in (None, 1):
            raise ApiError(400, f"n = {body.n} is not supported: only n = 1", param="n")
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=body.top_k or 0,
            min_p=0.0 if body.min_p is None else float(body.min_p),
            presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            penalty_decay=DEFAULT_PENALTY_DECAY if body.penalty_decay is None else float(body.penalty_decay),
            logit_bias=self.logit_bias(body.logit_bias),
            seed=body.seed,
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
            raise ApiError(
                429,
                str(e),
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except RwkvkitError as e:
            raise bad_request(e) from None

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
        self, record: _StreamRecord, handle, queue: asyncio.Queue, render: Render, save_path: Path | None
    ) -> AsyncIterator[str]:
        """The SSE body of one streamed answer. Closing it early (the client went away) cancels the
        engine request at once."""
        self.counters["active_streams"] += 1
        try:
            for chunk in render.prelude():
                yield sse(chunk)
            while True:
                _, event = await queue.get()
                # Text that has already arrived goes out in one chunk (under load the engine produces
                # tokens faster than a chunk per token can be written).
                texts = []
                while isinstance(event, TextEvent):
                    texts.append(event.text)
                    event = queue.get_nowait()[1] if not queue.empty() else None
                text = render.filter_text("".join(texts)) if texts else ""
                if text:
                    yield sse(render.text_chunk(text))
                if event is None:
                    continue
                record.finished = True
                for line in await self._stream_end(event, render, save_path):
                    yield line
                return
        except Exception:
            logger.exception("unexpected error while streaming")
            if not record.finished:
                record.finished = True
                self.engine.cancel(handle)
            yield sse(error_body("internal server error (see the server log)", "server_error"))
            yield SSE_DONE
        finally:
            self.counters["active_streams"] -= 1
            self.cancel_unfinished(record, handle)

    async def _stream_end(self, event: FinishEvent, render: Render, save_path: Path | None) -> list[str]:
        """The last events of a stream: the finish chunk (and usage), or the error; then [DONE]."""
        try:
            self.check_finish(event)
            if save_path is not None:
                await self.context.state_files.save(save_path, event.state)
        except ApiError as e:
            return [sse(error_body(e.message, e.type, e.param, e.code)), SSE_DONE]
        lines = [sse(render.finish_chunk(event))]
        if render.include_usage:
            lines.append(sse(render.usage_chunk(event)))
        return [*lines, SSE_DONE]

    def cancel_unfinished(self, record: _StreamRecord, handle) -> None:
        """The client left before the end: cancel the engine request (once)."""
        if not record.finished:
            record.finished = True
            self.counters["client_disconnects"] += 1
            self.engine.cancel(handle)

    def streaming_response(
        self, record: _StreamRecord, handle, body: AsyncIterator[str]
    ) -> StreamingResponse:
        # The background task also covers a client that leaves before the body starts.
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(self.cancel_unfinished, record, handle),
        )


# ---------------------------------------------------------------------------------------------- generation


class Render:
    """The response shapes of one generation request (a chunk of a stream, or the whole answer)."""

    object_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, include_usage: bool):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_name = model_name
        self.include_usage = include_usage

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

    def filter_text(self, text: str) -> str:
        return text

    def text_chunk(self, text: str) -> dict:
        raise NotImplementedError

    def finish_chunk(self, event: FinishEvent) -> dict:
        raise NotImplementedError

    def usage_chunk(self, event: FinishEvent) -> dict:
        return {**self.envelope(self.object_name, []), "usage": usage(event)}

    def response(self, event: FinishEvent) -> dict:
        raise NotImplementedError


class GenerationServing(Serving):
    """The one generation path of /v1/completions and /v1/chat/completions: the subclass gives the prompt,
    the checks of its own fields, the token limit, the stop strings and the response shapes."""

    def check_fields(self, body) -> None:
        """Refuse the fields this endpoint does not support."""

    def prompt_tokens(self, body) -> list[int]:
        raise NotImplementedError

    def request_max_tokens(self, body) -> int:
        raise NotImplementedError

    def request_stops(self, body) -> list[str]:
        return self.stop_strings(body.stop)

    def render(self, body) -> Render:
        raise NotImplementedError

    async def create(self, body, http_request: Request) -> Response:
        """Answer one request: checked in the order of its fields' meaning, then run on the engine and
        answered as a stream (``stream``) or as one JSON object."""
        self.context.check_model(body.model)
        self.check_fields(body)
        tokens = self.prompt_tokens(body)
        params = self.sampling(body)
        max_tokens = self.request_max_tokens(body)
        stops = self.request_stops(body)
        state_files = self.context.state_files
        save_path = state_files.path(body.save_state, "save_state") if body.save_state is not None else None
        state = await state_files.load(body.state)

        queue: asyncio.Queue = asyncio.Queue()
        handle = self.submit(tokens, params, max_tokens, stops, state, queue, texts=bool(body.stream))
        render = self.render(body)
        if body.stream:
            record = _StreamRecord()
            stream = self.stream(record, handle, queue, render, save_path)
            return self.streaming_response(record, handle, stream)
        try:
            event = await self.wait_finish(http_request, queue, handle)
        except ClientGone:
            return self.client_gone()
        self.check_finish(event)
        if save_path is not None:
            await state_files.save(save_path, event.state)
        return JSONResponse(render.response(event))


def wants_usage(body: SamplingRequest) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)
