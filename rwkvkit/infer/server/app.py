"""The FastAPI application: :func:`create_app`, the API-key check, the middleware and the routes.

The routes only route: each hands its body to the serving object of its endpoint (:mod:`.serving` and
the ``serving_*`` modules). The middleware, outermost first: :class:`CountResponses` (responses by
status, for ``/metrics``), :class:`LimitBodySize` (413 for a body over 8 MiB) and :class:`CatchAll500`
(an exception that escapes the application becomes a generic 500, logged with its traceback, never sent).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.chat_template import WORLD, ChatTemplate, WorldChatTemplate
from rwkvkit.infer.engine import Engine
from rwkvkit.infer.server.errors import add_exception_handlers, error_response
from rwkvkit.infer.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    documented_errors,
)
from rwkvkit.infer.server.serving import ServerContext
from rwkvkit.infer.server.serving_chat import ChatServing
from rwkvkit.infer.server.serving_completion import CompletionServing
from rwkvkit.infer.server.serving_embedding import EmbeddingServing
from rwkvkit.infer.server.serving_tokenize import TokenizeServing
from rwkvkit.infer.server.state_files import open_state_dir

logger = logging.getLogger("rwkvkit.serve")

MAX_BODY_BYTES = 8 * 2**20
REASONING_PARSERS = (None, "think")
# module level: with postponed annotations, FastAPI resolves dependency annotations in the module globals
BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")


# ---------------------------------------------------------------------------------------------- middleware


class CountResponses:
    """ASGI middleware: counts the responses sent, and the 4xx and 5xx among them, in ``counters``."""

    def __init__(self, app, counters: dict[str, int]):
        self.app = app
        self.counters = counters

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.counters["http_responses"] += 1
                if 400 <= status < 500:
                    self.counters["http_4xx"] += 1
                elif status >= 500:
                    self.counters["http_5xx"] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class LimitBodySize:
    """ASGI middleware: answers 413 to a request whose Content-Length is over ``MAX_BODY_BYTES``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length", b"0")
            try:
                too_big = int(length) > MAX_BODY_BYTES
            except ValueError:
                too_big = False
            if too_big:
                error = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CatchAll500:
    """ASGI middleware: an exception that escapes the application becomes a generic 500 (when no response
    was started yet), logged with its traceback and never sent to the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            logger.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(ApiError(500, "internal server error (see the server log)"))
                await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------- auth


def api_key_check(api_key: str | None):
    """The dependency of the keyed routes: ``Authorization: Bearer <api_key>`` (nothing when None)."""

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

    return require_key


# ---------------------------------------------------------------------------------------------- routes


def api_router(context: ServerContext, api_key: str | None) -> APIRouter:
    """The routes: ``/health`` (never keyed); ``/metrics``, ``/v1/*`` and the tokenizer routes (keyed when
    ``api_key`` is set)."""
    router = APIRouter()
    keyed = [Depends(api_key_check(api_key))]
    errors = documented_errors(400, 401, 404, 429, 500)
    completion, chat, embedding = CompletionServing(context), ChatServing(context), EmbeddingServing(context)
    tokenize = TokenizeServing(context)

    @router.get("/health", summary="liveness: always ok while the server runs")
    async def health() -> dict:
        uptime = round(time.monotonic() - context.started, 1)
        return {"status": "ok", "model": context.model_name, "uptime_seconds": uptime}

    @router.get(
        "/metrics", dependencies=keyed, responses=documented_errors(401), summary="engine and server stats"
    )
    async def metrics() -> dict:
        return context.metrics()

    @router.get("/v1/models", dependencies=keyed, responses=documented_errors(401))
    async def list_models() -> dict:
        return {"object": "list", "data": [context.model_card()]}

    @router.get("/v1/models/{model_id:path}", dependencies=keyed, responses=documented_errors(401, 404))
    async def get_model(model_id: str) -> dict:
        context.check_model(model_id)
        return context.model_card()

    @router.post("/v1/completions", dependencies=keyed, responses=errors)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion.create(body, request)

    @router.post("/v1/chat/completions", dependencies=keyed, responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @router.post("/v1/embeddings", dependencies=keyed, responses=errors)
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await embedding.create(body, request)

    tokenizer_errors = documented_errors(400, 401, 404)

    @router.post("/tokenize", dependencies=keyed, responses=tokenizer_errors, summary="text to token ids")
    async def tokenize_text(body: TokenizeRequest) -> dict:
        return tokenize.tokenize(body)

    @router.post("/detokenize", dependencies=keyed, responses=tokenizer_errors, summary="token ids to text")
    async def detokenize_tokens(body: DetokenizeRequest) -> dict:
        return tokenize.detokenize(body)

    @router.get("/tokenizer_info", dependencies=keyed, responses=documented_errors(401), summary="tokenizer")
    async def tokenizer_info() -> dict:
        return tokenize.tokenizer_info()

    return router


# ---------------------------------------------------------------------------------------------- app


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    *,
    max_tokens_limit: int = 4096,
    state_dir: str | os.PathLike | None = None,
    chat_template: ChatTemplate | WorldChatTemplate = WORLD,
    reasoning_parser: str | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` (already started: ``engine.start()``) as ``model_name``.

    api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <api_key>``.
    max_tokens_limit: the most tokens one request may ask for (more is a 400).
    state_dir: the directory of state files (created if missing); None disables them.
    chat_template: how /v1/chat/completions turns messages into the prompt (and where replies stop):
        the World chat format by default, or a :class:`~rwkvkit.infer.chat_template.ChatTemplate`.
    reasoning_parser: None, or ``"think"``: chat replies that open with ``<think>...</think>`` answer that
        block as ``reasoning_content`` (:mod:`rwkvkit.infer.reasoning`).
    """
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise RwkvkitError(f"max_tokens_limit must be an integer >= 1, got {max_tokens_limit!r}")
    if reasoning_parser not in REASONING_PARSERS:
        raise RwkvkitError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {reasoning_parser!r}")
    context = ServerContext(
        engine, model_name, max_tokens_limit, open_state_dir(state_dir), chat_template, reasoning_parser
    )
    app = FastAPI(title="rwkvkit", summary="OpenAI-compatible API of one RWKV model", version="1")
    app.state.context = context
    # add_middleware puts each one outside the ones before it: CountResponses ends up outermost
    app.add_middleware(CatchAll500)
    app.add_middleware(LimitBodySize)
    app.add_middleware(CountResponses, counters=context.counters)
    add_exception_handlers(app)
    app.include_router(api_router(context, api_key))
    return app
