"""Errors in OpenAI's shape: the JSON body and response of an :class:`ApiError`, the mapping of pydantic's
validation errors to one 400 that names the field, and the application's exception handlers."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkvkit.errors import RwkvkitError
from rwkvkit.infer.server.protocol import ApiError

_SCALAR_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {...}}``: the body of an error answer (also sent as an event in a stream)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: ApiError) -> Response:
    """The JSON response of ``error``."""
    # ensure_ascii: an error message may quote client input, which can hold lone surrogates
    content = json.dumps(error_body(error.message, error.type, error.param, error.code), ensure_ascii=True)
    return Response(content, status_code=error.status, headers=error.headers, media_type="application/json")


def bad_request(error: RwkvkitError) -> ApiError:
    """A 400 for a library check that failed: its message, and the request field it names (``param``)."""
    return ApiError(400, str(error), param=getattr(error, "param", None))


def _is_type_tag(part: object) -> bool:
    """Whether a location part is pydantic's name of a union member ('str', 'list[int]', 'ContentPart')."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part or part[:1].isupper())


def validation_error(errors: list[dict]) -> ApiError:
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


async def _on_api_error(request: Request, error: ApiError) -> Response:
    return error_response(error)


async def _on_validation_error(request: Request, error: RequestValidationError) -> Response:
    return error_response(validation_error(list(error.errors())))


async def _on_http_error(request: Request, error: StarletteHTTPException) -> Response:
    detail = error.detail if isinstance(error.detail, str) else "request refused"
    return error_response(ApiError(error.status_code, detail, headers=dict(error.headers or {})))


def add_exception_handlers(app: FastAPI) -> None:
    """Answer ApiError, request validation errors (FastAPI's 422 becomes 400) and Starlette's HTTP errors
    (404 for an unknown path, 405, ...) in OpenAI's shape."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
