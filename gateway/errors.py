"""Errors a client can see, and the one place that turns any exception into a response.

Routes raise `ApiError(status, message, ...)`. The handlers render it in the caller's dialect:
OpenAI's `{"error": {"message", "type", "param", "code"}}` under /v1/, TGI's
`{"error", "error_type"}` elsewhere. FastAPI's request-validation 422 becomes a 400 in those
shapes, and an unexpected exception becomes a 500 with no traceback in the body (it goes to the
log instead) and the connection stays open.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("spindle.gateway")

# TGI's `error_type` names, by status.
_TGI_ERROR_TYPES = {
    400: "validation",
    401: "authentication",
    404: "not_found",
    429: "overloaded",
    500: "generation",
    503: "unavailable",
    504: "timeout",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An error with its HTTP status and a message meant for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        fallback = "invalid_request_error" if status < 500 else "internal_error"
        self.type = type or _OPENAI_ERROR_TYPES.get(status, fallback)
        self.param = param
        self.code = code
        self.headers = headers or {}


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready (nobody reads the reply)."""


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def openai_error_body(error: ApiError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def tgi_error_body(error: ApiError) -> dict[str, Any]:
    return {"error": error.message, "error_type": _TGI_ERROR_TYPES.get(error.status, error.type)}


def error_response(path: str, error: ApiError) -> JSONResponse:
    body = openai_error_body(error) if is_openai_path(path) else tgi_error_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def validation_error(errors: Sequence[Any]) -> ApiError:
    """One readable 400 from pydantic's error list: the first problem, with where and what."""
    if not errors:
        return bad_request("the request is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return bad_request(f"the request body is not valid JSON: {detail}")
    location = [part for part in first.get("loc", ()) if part != "body"]
    param = _dotted(location) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing" and param:
        return bad_request(f"{param} is required", param=param)
    got = first.get("input")
    if param and not isinstance(got, dict | list) and got is not None:
        message = f"{message} (got {got!r})"
    return bad_request(f"{param}: {message}" if param else message, param=param)


def _dotted(location: Sequence[Any]) -> str:
    """("messages", 0, "role") -> "messages[0].role"; pydantic's union-member tags dropped."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not _is_union_tag(part):
            text += f".{part}" if text else part
    return text


def _is_union_tag(part: str) -> bool:
    """Pydantic names the member of a union that failed: "str", "list[int]", "function-after[...]"."""
    return part in {"str", "int", "float", "bool", "none"} or "[" in part


def install_error_handlers(app: FastAPI) -> None:
    """Every exception ends as a JSON body in the caller's dialect; none shows a traceback."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(request.url.path, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(request.url.path, validation_error(exc.errors()))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error = ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return error_response(request.url.path, error)

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        logger.warning("redis unavailable during %s: %s", request.url.path, exc)
        error = ApiError(503, f"Redis is unreachable: {exc}", headers={"Retry-After": "1"})
        return error_response(request.url.path, error)

    async def on_disconnected(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(redis.exceptions.ConnectionError, on_redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, on_redis_down)
    app.add_exception_handler(ClientDisconnected, on_disconnected)
    # Added last, so it is the outermost middleware: it sees what every handler let through.
    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """Answers an unexpected exception with a 500 in the caller's dialect and logs the
    traceback. Unlike an `Exception` handler (which Starlette re-raises to the server, so the
    connection is closed), this keeps the connection usable."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise  # too late for a clean answer; the server closes the connection
            logger.exception("unexpected error in %s %s", scope["method"], scope["path"])
            error = ApiError(500, f"internal error ({type(exc).__name__}); see the gateway log")
            await error_response(scope["path"], error)(scope, receive, send)
