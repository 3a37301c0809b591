"""``rwkvkit serve``: an OpenAI-compatible HTTP API over the continuous-batching :class:`Engine`.

This module owns the HTTP side of serving: the request schemas and their validation, the OpenAI
response, streaming and error formats, the World chat prompt built from a list of messages, embeddings,
state files inside ``--state-dir``, and the bridge from the engine thread to asyncio (``rwkvkit serve``,
in the command-line package, runs it under uvicorn). :func:`create_app` builds the FastAPI application
around an engine that the caller has started (``engine.start()``); it can be driven without uvicorn.

Endpoints (``/v1/*`` and ``/metrics`` need ``Authorization: Bearer KEY`` when an API key is set):

* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served (OpenAI list / model objects).
* ``POST /v1/completions``: ``prompt`` is one string or one list of token ids (arrays of prompts are
  refused); ``max_tokens`` defaults to 16 as in OpenAI's API. Sampling fields: ``temperature`` [0, 2],
  ``top_p`` (0, 1], ``top_k``, ``min_p``, ``presence_penalty`` / ``frequency_penalty`` [-2, 2],
  ``penalty_decay``, ``logit_bias`` {"token id": bias in [-100, 100]}, ``stop`` (up to 4 strings),
  ``seed``, ``stream`` (+ ``stream_options.include_usage``), ``n`` (1 only). rwkvkit extras: ``state``
  (start from a state file) and ``save_state`` (write the final state to a state file).
* ``POST /v1/chat/completions``: ``messages`` (system / developer / user / assistant; content a string
  or a list of text parts) become the World chat prompt ``System: ...\\n\\nUser: ...\\n\\nAssistant:``
  (each message normalised by :func:`rwkvkit.infer.chat.normalize_message`: blank lines collapse to one
  newline, so a message cannot start a new turn); generation always stops at ``\\n\\nUser:`` (plus the
  client's stops) and the reply loses the one space the model writes after ``Assistant:``.
  ``max_completion_tokens`` (or ``max_tokens``) defaults to ``--max-tokens-limit``.
* ``POST /v1/embeddings``: one vector per input (a string, a list of strings, a list of token ids or a
  list of such lists). The vector is the last layer's ``ffn_shift`` row of the state after reading the
  input: the layer-normalised input of the last channel mix at the last token (dimension ``n_embd``),
  L2-normalised. Inputs run through the engine with ``max_tokens=0`` (so they share its batching, its
  bounded queue and its prefix cache), at most ``max_batch`` of one request at a time.
* ``GET /health`` (never needs the key), ``GET /metrics``: ``engine.stats()`` (waiting, running,
  tokens/s, counters, prefix-cache hits / misses / hit_rate) plus this server's own counters.

Streaming answers are Server-Sent Events, ``data: {json}\\n\\n`` per chunk, flushed as the tokens arrive,
ending with ``data: [DONE]\\n\\n`` (text that has already arrived when a chunk is written goes out in that
chunk). A client that goes away mid-stream (or before a non-streamed answer is ready) has its engine
request cancelled at once, so its slot is freed at the next engine step. A failure after the stream
started is sent as one ``data: {"error": ...}`` event, then ``[DONE]``.

Threading: the engine calls back on its own thread; an :class:`_EventBridge` per event loop carries the
events onto each request's ``asyncio.Queue`` with ``loop.call_soon_threadsafe`` (one wake-up of the loop
per batch of events). On Ctrl-C / SIGTERM ``rwkvkit serve`` cancels the running requests first, so open
streams end with a "shutting down" error instead of holding up the exit.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON,
wrong types, missing fields and invalid values (FastAPI's 422 is turned into 400), 401 for a missing or
wrong API key, 404 for an unknown model or state file, 413 for a body over 8 MiB, 429 with
``Retry-After`` when the engine's queue is full, 500 with a generic message for anything unexpected
(logged with its traceback, never sent).

State files (``state`` / ``save_state``) are plain file names inside ``--state-dir``: letters, digits,
``_``, ``-`` and ``.``, not starting with ``.``, no ``..``, no path separators; ``.safetensors`` is added
when missing, and a name that resolves outside the directory (a symlink) is refused. They are read and
written with :func:`rwkvkit.state_io.load_state` / :func:`~rwkvkit.state_io.save_state`, which refuse a
state of another model (400). Without ``--state-dir`` both fields are refused (400).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat import normalize_message
from rwkvkit.infer.engine import Engine, EngineFull, FinishEvent, TextEvent
from rwkvkit.infer.sampling import DEFAULT_PENALTY_DECAY, SamplingParams
from rwkvkit.state import RWKVState

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # the optional "serve" extra
    raise RwkvkitError(
        f"rwkvkit serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'rwkvkit[serve]'"
    ) from None

logger = logging.getLogger("rwkvkit.serve")

CHAT_STOP = "\n\nUser:"  # the model starting the next user turn (World chat format)
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's API
MAX_STOP_STRINGS = 4
MAX_EMBEDDING_INPUTS = 2048
MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
RETRY_AFTER_S = 1
STATE_SUFFIX = ".safetensors"
STATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# module level: with postponed annotations, FastAPI resolves dependency annotations in the module globals
BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")

# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: ApiError) -> Response:
    # ensure_ascii: an error message may quote client input, which can hold lone surrogates
    content = json.dumps(error_body(error.message, error.type, error.param, error.code), ensure_ascii=True)
    return Response(content, status_code=error.status, headers=error.headers, media_type="application/json")


_SCALAR_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part: object) -> bool:
    """Whether a location part is pydantic's name of a union member ('str', 'list[int]', 'ContentPart')."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part or part[:1].isupper())


def _validation_error(errors: list[dict]) -> ApiError:
    """One 400 ApiError naming the first problem pydantic found."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""))
    if not loc and first.get("type") == "missing":
        return ApiError(400, "missing request body: send a JSON object")
    # drop the union member tags pydantic puts in the location ('prompt.str', 'prompt.list[int].0')
    path = [str(p) for p in loc if not _is_type_tag(p)]
    field = ".".join(path)
    param = str(loc[0]) if loc else None
    if first.get("type") == "missing":
        return ApiError(400, f"missing required field '{field}'", param=param)
    if field and any(_is_type_tag(p) for p in loc):  # no member of a union matched: list what each wanted
        same = [e for e in errors if e.get("loc", ())[:2] == first.get("loc", ())[:2]]
        wanted = list(dict.fromkeys(e.get("msg", "") for e in same))[:3]
        return ApiError(
            400, f"invalid '{field}' (none of its accepted forms): {'; '.join(wanted)}", param=param
        )
    if field:
        return ApiError(400, f"invalid '{field}': {first.get('msg', 'invalid value')}", param=param)
    return ApiError(400, f"invalid request body: {first.get('msg', 'invalid value')}")


def _param_of(message: str) -> str | None:
    """The request field an engine / sampling error message is about (they start with its name)."""
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "penalty_decay",
        "logit_bias",
        "seed",
        "max_tokens",
    ):
        if message.startswith(name):
            return name
    if "prompt" in message:
        return "prompt"
    if message.startswith("state"):
        return "state"
    return None


# ---------------------------------------------------------------------------------------------- schemas

Temperature = Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2, allow_inf_nan=False)]
Bias = Annotated[StrictFloat, Field(ge=-100, le=100, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)]  # what torch.Generator.manual_seed accepts
TokenIds = list[StrictInt]


class _Body(BaseModel):
    # Fields this server does not know are ignored (clients send newer OpenAI fields).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: StrictStr
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Count | None = Field(None, description="rwkvkit extra: keep the K most likely tokens (0 = all)")
    min_p: Fraction | None = Field(None, description="rwkvkit extra: min-p filtering")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    penalty_decay: Fraction | None = Field(
        None, description="rwkvkit extra: the penalty counts decay by this factor every token (0.996)"
    )
    logit_bias: dict[str, Bias] | None = Field(None, description="token id (as a string) -> bias")
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Seed | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(1, description="only 1 is supported")
    user: StrictStr | None = Field(None, description="ignored")
    state: StrictStr | None = Field(
        None, description="rwkvkit extra: a state file in --state-dir to start from"
    )
    save_state: StrictStr | None = Field(
        None, description="rwkvkit extra: a state file in --state-dir to write the final state to"
    )


class CompletionRequest(_Sampling):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] = Field(
        description="one string or one list of token ids (arrays of prompts are not supported)"
    )
    max_tokens: Count | None = None
    logprobs: StrictInt | None = Field(None, description="not supported")
    echo: StrictBool | None = Field(False, description="not supported")
    best_of: StrictInt | None = Field(None, description="only 1 is supported")
    suffix: StrictStr | None = Field(None, description="not supported")


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = Field(None, description="ignored")


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: StrictBool | None = Field(False, description="not supported")


class EmbeddingRequest(_Body):
    model: StrictStr
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: StrictInt | None = Field(None, description="must be n_embd when given")
    user: StrictStr | None = Field(None, description="ignored")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _documented_errors(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse} for status in statuses}


# ---------------------------------------------------------------------------------------------- helpers


def build_chat_prompt(messages: list[ChatMessage]) -> str:
    """The World chat prompt: ``Role: text`` turns joined by ``\\n\\n``, then ``\\n\\nAssistant:``."""
    turns = []
    for i, message in enumerate(messages):
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            pieces = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ApiError(
                        400,
                        f"messages[{i}]: only text content parts are supported, got type '{part.type}'",
                        param="messages",
                    )
                pieces.append(part.text)
            text = "\n".join(pieces)
        _check_text(text, "messages")
        text = normalize_message(text)
        role = CHAT_ROLES[message.role]
        turns.append(f"{role}: {text}" if text else f"{role}:")
    return "\n\n".join(turns) + "\n\nAssistant:"


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text (a lone surrogate?)", param=param) from None


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _usage(event: FinishEvent) -> dict:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": event.cached_tokens},
    }


class _LeadingSpace:
    """Drops the one space that starts a chat reply (the model writes ``Assistant: text``)."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, text: str) -> str:
        if self.first and text:
            self.first = False
            return text[1:] if text.startswith(" ") else text
        return text


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _Stream:
    """Bookkeeping of one streamed answer: whether its engine request finished on its own."""

    def __init__(self) -> None:
        self.finished = False


class _EventBridge:
    """Carries engine events from the engine thread to asyncio queues on one event loop.

    ``post`` (engine thread) appends to a list and, unless a delivery is already scheduled, schedules one
    with ``loop.call_soon_threadsafe``; the delivery (loop thread) puts everything posted so far on
    its queues. One wake-up of the loop per engine step instead of one per token and request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, item in pending:
            queue.put_nowait(item)


class _CatchAll:
    """ASGI middleware: counts responses by status, refuses oversized bodies, and turns any exception that
    escapes the application into a generic 500 (logged with its traceback, never sent to the client)."""

    def __init__(self, app, counters: dict[str, int]):
        self.app = app
        self.counters = counters

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                self.counters["http_responses"] += 1
                if 400 <= status < 500:
                    self.counters["http_4xx"] += 1
                elif status >= 500:
                    self.counters["http_5xx"] += 1
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        try:
            too_big = int(length) > MAX_BODY_BYTES
        except ValueError:
            too_big = False
        if too_big:
            await error_response(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes"))(
                scope, receive, counting_send
            )
            return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            logger.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(ApiError(500, "internal server error (see the server log)"))
                await response(scope, receive, counting_send)


# ---------------------------------------------------------------------------------------------- service


class _Service:
    """What the routes share: the engine, the limits, the state directory, counters."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        max_tokens_limit: int,
        state_dir: Path | None,
    ):
        self.engine = engine
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.state_dir = state_dir
        self.vocab_size = engine.model.config.vocab_size
        self.created = int(time.time())
        self.started = time.monotonic()
        self._bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.counters = {
            "http_responses": 0,
            "http_4xx": 0,
            "http_5xx": 0,
            "active_streams": 0,
            "client_disconnects": 0,
            "state_files_written": 0,
            "state_files_read": 0,
        }

    # ------------------------------------------------------------------------------- request checks

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ApiError(
                404,
                f"model '{shown}' not found: this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def encode(self, text: str, param: str) -> list[int]:
        _check_text(text, param)
        return self.engine.tokenizer.encode(text) if text else []

    def prompt_tokens(self, prompt: str | list) -> list[int]:
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

    def sampling(self, body: _Sampling) -> SamplingParams:
        if body.n not in (None, 1):
            raise ApiError(400, f"n = {body.n} is not supported: only n = 1", param="n")
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            token = int(key) if re.fullmatch(r"-?[0-9]{1,12}", key.strip()) else None
            if token is None or not 0 <= token < self.vocab_size:
                shown = key if len(key) <= 20 else key[:20] + "..."
                raise ApiError(
                    400,
                    f"logit_bias: '{shown}' is not a token id of this model [0, {self.vocab_size})",
                    param="logit_bias",
                )
            bias[token] = float(value)
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=body.top_k or 0,
            min_p=0.0 if body.min_p is None else float(body.min_p),
            presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            penalty_decay=DEFAULT_PENALTY_DECAY if body.penalty_decay is None else float(body.penalty_decay),
            logit_bias=bias,
            seed=body.seed,
        )
        try:
            params.check(self.vocab_size)
        except RwkvkitError as e:
            raise ApiError(400, str(e), param=_param_of(str(e))) from None
        return params

    def max_tokens(self, value: int | None, default: int, param: str = "max_tokens") -> int:
        if value is None:
            return min(default, self.max_tokens_limit)
        if value > self.max_tokens_limit:
            raise ApiError(
                400, f"{param} = {value} is over this server's limit of {self.max_tokens_limit}", param=param
            )
        return value

    @staticmethod
    def stop_strings(stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        for s in stops:
            if not s:
                raise ApiError(400, "stop strings must not be empty", param="stop")
            _check_text(s, "stop")
        return stops

    # ------------------------------------------------------------------------------- state files

    def state_path(self, name: str, param: str) -> Path:
        """The file ``name`` names inside the state directory; ApiError 400 for anything else."""
        if self.state_dir is None:
            raise ApiError(
                400, "state files are disabled (start the server with --state-dir DIR)", param=param
            )
        plain = (
            "/" not in name
            and "\\" not in name
            and ".." not in name
            and not os.path.isabs(name)
            and STATE_NAME.fullmatch(name) is not None
        )
        if not plain:
            raise ApiError(
                400,
                f"'{param}' must be a plain file name inside the state directory (letters, digits, '_', '-', "
                "'.'; no path separators, no '..', not starting with '.')",
                param=param,
            )
        if not name.endswith(STATE_SUFFIX):
            name += STATE_SUFFIX
        root = self.state_dir.resolve()
        path = (root / name).resolve()
        if path.parent != root:
            raise ApiError(400, f"'{param}' resolves outside the state directory", param=param)
        return path

    async def load_state(self, name: str | None) -> RWKVState | None:
        if name is None:
            return None
        from rwkvkit.state_io import load_state

        path = self.state_path(name, "state")
        if not path.is_file():
            raise ApiError(404, f"state file '{path.name}' not found", param="state", code="state_not_found")
        try:
            state = await asyncio.to_thread(load_state, path, self.engine.model)
        except RwkvkitError as e:
            message = str(e).replace(str(path), path.name)  # do not show where the directory is
            raise ApiError(400, message, param="state") from None
        self.counters["state_files_read"] += 1
        return state

    async def save_state(self, path: Path, state: RWKVState | None) -> None:
        from rwkvkit.state_io import save_state

        if state is None:
            raise ApiError(500, "no final state to save")
        try:
            await asyncio.to_thread(save_state, state, path, self.engine.model)
        except (RwkvkitError, OSError):
            logger.exception("could not write the state file %s", path)
            raise ApiError(500, f"could not write the state file '{path.name}'") from None
        self.counters["state_files_written"] += 1

    # ------------------------------------------------------------------------------- the engine

    def bridge(self) -> _EventBridge:
        """The event bridge of the running event loop (one per loop)."""
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = _EventBridge(loop)
        return bridge

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
        engine thread by this event loop's :class:`_EventBridge` (TextEvents only when ``texts``)."""
        bridge = self.bridge()

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
            raise ApiError(400, str(e), param=_param_of(str(e))) from None

    @staticmethod
    async def next_event(http_request: Request, queue: asyncio.Queue) -> tuple[int | None, Any]:
        """The next (tag, event) on ``queue``; raises _ClientGone if the client disconnects meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    raise _ClientGone from None

    async def wait_finish(self, http_request: Request, queue: asyncio.Queue, handle) -> FinishEvent:
        """Wait for the request's FinishEvent (cancelling it if the client goes away)."""
        try:
            while True:
                _, event = await self.next_event(http_request, queue)
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

    async def stream(
        self,
        record: _Stream,
        handle,
        queue: asyncio.Queue,
        prelude: list[dict],
        text_chunk: Callable[[str], dict],
        finish_chunk: Callable[[FinishEvent], dict],
        usage_chunk: Callable[[FinishEvent], dict] | None,
        text_filter: Callable[[str], str] | None,
        save_path: Path | None,
    ) -> AsyncIterator[str]:
        """The SSE body of one streamed answer. Closing it early (the client went away) cancels the
        engine request at once."""
        self.counters["active_streams"] += 1
        try:
            for chunk in prelude:
                yield _sse(chunk)
            while True:
                _, event = await queue.get()
                # Text that has already arrived goes out in one chunk (under load the engine produces
                # tokens faster than a chunk per token can be written).
                texts = []
                while isinstance(event, TextEvent):
                    texts.append(event.text)
                    event = queue.get_nowait()[1] if not queue.empty() else None
                if texts:
                    text = "".join(texts)
                    text = text_filter(text) if text_filter else text
                    if text:
                        yield _sse(text_chunk(text))
                if event is None:
                    continue
                record.finished = True
                try:
                    self.check_finish(event)
                    if save_path is not None:
                        await self.save_state(save_path, event.state)
                except ApiError as e:
                    yield _sse(error_body(e.message, e.type, e.param, e.code))
                    yield SSE_DONE
                    return
                yield _sse(finish_chunk(event))
                if usage_chunk is not None:
                    yield _sse(usage_chunk(event))
                yield SSE_DONE
                return
        except Exception:
            logger.exception("unexpected error while streaming")
            if not record.finished:
                record.finished = True
                self.engine.cancel(handle)
            yield _sse(error_body("internal server error (see the server log)", "server_error"))
            yield SSE_DONE
        finally:
            self.counters["active_streams"] -= 1
            self.cancel_unfinished(record, handle)

    def cancel_unfinished(self, record: _Stream, handle) -> None:
        """The client left before the end: cancel the engine request (once)."""
        if not record.finished:
            record.finished = True
            self.counters["client_disconnects"] += 1
            self.engine.cancel(handle)

    def streaming_response(self, record: _Stream, handle, body: AsyncIterator[str]) -> StreamingResponse:
        # The background task also covers a client that leaves before the body starts.
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers=SSE_HEADERS,
            background=BackgroundTask(self.cancel_unfinished, record, handle),
        )

    # ------------------------------------------------------------------------------- endpoints

    async def completions(self, body: CompletionRequest, http_request: Request) -> Response:
        self.check_model(body.model)
        if body.logprobs is not None:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported (only 1)", param="best_of")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        tokens = self.prompt_tokens(body.prompt)
        params = self.sampling(body)
        max_tokens = self.max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        stops = self.stop_strings(body.stop)
        save_path = self.state_path(body.save_state, "save_state") if body.save_state is not None else None
        state = await self.load_state(body.state)

        queue: asyncio.Queue = asyncio.Queue()
        handle = self.submit(tokens, params, max_tokens, stops, state, queue, texts=bool(body.stream))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            record = _Stream()

            def usage_chunk(event: FinishEvent) -> dict:
                return {**chunk("", None), "choices": [], "usage": _usage(event)}

            stream = self.stream(
                record,
                handle,
                queue,
                prelude=[],
                text_chunk=lambda text: chunk(text, None),
                finish_chunk=lambda event: chunk("", event.reason),
                usage_chunk=usage_chunk if include_usage else None,
                text_filter=None,
                save_path=save_path,
            )
            return self.streaming_response(record, handle, stream)

        try:
            event = await self.wait_finish(http_request, queue, handle)
        except _ClientGone:
            return self.client_gone()
        self.check_finish(event)
        if save_path is not None:
            await self.save_state(save_path, event.state)
        return JSONResponse({**chunk(event.text, event.reason), "usage": _usage(event)})

    async def chat_completions(self, body: ChatCompletionRequest, http_request: Request) -> Response:
        self.check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        prompt = build_chat_prompt(body.messages)
        tokens = self.encode(prompt, "messages")
        params = self.sampling(body)
        if body.max_completion_tokens is not None:
            max_tokens = self.max_tokens(body.max_completion_tokens, 0, "max_completion_tokens")
        else:
            max_tokens = self.max_tokens(body.max_tokens, self.max_tokens_limit)
        stops = [CHAT_STOP, *self.stop_strings(body.stop)]
        save_path = self.state_path(body.save_state, "save_state") if body.save_state is not None else None
        state = await self.load_state(body.state)

        queue: asyncio.Queue = asyncio.Queue()
        handle = self.submit(tokens, params, max_tokens, stops, state, queue, texts=bool(body.stream))
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish_reason: str | None) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            record = _Stream()

            def usage_chunk(event: FinishEvent) -> dict:
                return {**chunk({}, None), "choices": [], "usage": _usage(event)}

            stream = self.stream(
                record,
                handle,
                queue,
                prelude=[chunk({"role": "assistant"}, None)],
                text_chunk=lambda text: chunk({"content": text}, None),
                finish_chunk=lambda event: chunk({}, event.reason),
                usage_chunk=usage_chunk if include_usage else None,
                text_filter=_LeadingSpace(),
                save_path=save_path,
            )
            return self.streaming_response(record, handle, stream)

        try:
            event = await self.wait_finish(http_request, queue, handle)
        except _ClientGone:
            return self.client_gone()
        self.check_finish(event)
        if save_path is not None:
            await self.save_state(save_path, event.state)
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _LeadingSpace()(event.text)},
                        "logprobs": None,
                        "finish_reason": event.reason,
                    }
                ],
                "usage": _usage(event),
            }
        )

    def embedding_inputs(self, value: str | list) -> list[list[int]]:
        if isinstance(value, str):
            items: list = [value]
        elif value and all(isinstance(v, int) for v in value):
            items = [list(value)]
        else:
            items = list(value)
        if not items:
            raise ApiError(400, "'input' is empty", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
        out = []
        for item in items:
            tokens = self.encode(item, "input") if isinstance(item, str) else list(item)
            if not tokens:
                raise ApiError(400, "an input is empty: each needs at least one token", param="input")
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(
                    400,
                    f"input token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                    param="input",
                )
            out.append(tokens)
        return out

    async def embeddings(self, body: EmbeddingRequest, http_request: Request) -> Response:
        self.check_model(body.model)
        n_embd = self.engine.model.config.n_embd
        if body.dimensions is not None and body.dimensions != n_embd:
            raise ApiError(400, f"dimensions must be {n_embd} (this model's n_embd)", param="dimensions")
        inputs = self.embedding_inputs(body.input)
        params = SamplingParams(temperature=0.0)
        queue: asyncio.Queue = asyncio.Queue()
        in_flight: dict[int, Any] = {}  # input index -> engine request
        finished: list[FinishEvent | None] = [None] * len(inputs)
        next_input = 0
        try:
            while next_input < len(inputs) or in_flight:
                while next_input < len(inputs) and len(in_flight) < self.engine.max_batch:
                    try:
                        in_flight[next_input] = self.submit(
                            inputs[next_input],
                            params,
                            max_tokens=0,
                            stop_strings=[],
                            state=None,
                            queue=queue,
                            tag=next_input,
                            texts=False,
                            stop_tokens=(),
                        )
                    except ApiError as e:
                        if e.status == 429 and in_flight:
                            break  # wait for one of ours to finish, then try again
                        raise
                    next_input += 1
                tag, event = await self.next_event(http_request, queue)
                in_flight.pop(tag, None)
                self.check_finish(event)
                finished[tag] = event
        except _ClientGone:
            for handle in in_flight.values():
                self.engine.cancel(handle)
            return self.client_gone()
        except BaseException:
            for handle in in_flight.values():
                self.engine.cancel(handle)
            raise
        data = []
        for i, event in enumerate(finished):
            vector = embedding_vector(event.state)
            if body.encoding_format == "base64":
                value: Any = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n_tokens = sum(len(t) for t in inputs)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": self.model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rwkvkit"}

    def metrics(self) -> dict:
        stats = self.engine.stats()
        stats.setdefault("prefix_cache", None)
        return {"model": self.model_name, **stats, "server": dict(self.counters)}


def embedding_vector(state: RWKVState) -> torch.Tensor:
    """The embedding of the text a (B = 1) state has read: the last layer's ``ffn_shift`` row (the
    normalised input of its channel mix at the last token), as float32 on the CPU, L2-normalised."""
    vector = state.ffn_shift[-1, 0].detach().to(device="cpu", dtype=torch.float32)
    return vector / vector.norm().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------- app


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_tokens_limit: int = 4096,
    state_dir: str | os.PathLike | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` (already started: ``engine.start()``) as ``model_name``.

    api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
    max_tokens_limit: the most tokens one request may ask for (more is a 400).
    state_dir: the directory of state files (created if missing); None disables them.
    """
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise RwkvkitError(f"max_tokens_limit must be an integer >= 1, got {max_tokens_limit!r}")
    directory = None
    if state_dir is not None:
        directory = Path(state_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RwkvkitError(f"cannot create the state directory {directory}: {e.strerror or e}") from None
        if not directory.is_dir():
            raise RwkvkitError(f"the state directory {directory} is not a directory")
    service = _Service(engine, model_name, max_tokens_limit, directory)

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer KEY'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(
            credentials.credentials.encode("utf-8", "replace"), api_key.encode("utf-8")
        ):
            raise ApiError(
                401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
            )

    app = FastAPI(
        title="rwkvkit",
        summary="OpenAI-compatible API of one RWKV model",
        version="1",
    )
    app.state.service = service
    app.add_middleware(_CatchAll, counters=service.counters)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(_validation_error(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = error.detail if isinstance(error.detail, str) else "request refused"
        return error_response(ApiError(error.status_code, detail, headers=dict(error.headers or {})))

    keyed = [Depends(require_key)]
    errors = _documented_errors(400, 401, 404, 429, 500)

    @app.get("/health", summary="liveness: always ok while the server runs")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "uptime_seconds": round(time.monotonic() - service.started, 1),
        }

    @app.get(
        "/metrics", dependencies=keyed, responses=_documented_errors(401), summary="engine and server stats"
    )
    async def metrics() -> dict:
        return service.metrics()

    @app.get("/v1/models", dependencies=keyed, responses=_documented_errors(401))
    async def list_models() -> dict:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=keyed, responses=_documented_errors(401, 404))
    async def get_model(model_id: str) -> dict:
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/completions", dependencies=keyed, responses=errors)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=keyed, responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await service.chat_completions(body, request)

    @app.post("/v1/embeddings", dependencies=keyed, responses=errors)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await service.embeddings(body, request)

    return app
