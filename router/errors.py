"""Every answer other than 200 is an OpenAI-style error body: ``ApiError`` and the app's handlers.

Code raises ``ApiError(status, message, param=...)`` wherever it finds the problem; the handlers
installed by :func:`add_error_handlers` turn it, and anything FastAPI or Starlette raise, into
``{"error": {"message", "type", "param", "code"}}`` with the right status (and ``Retry-After`` on
429 / 503), so a client never sees a framework's own error shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .openai_protocol import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200, as an OpenAI-style error body."""

    _TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
              429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self._TYPES.get(status, "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def param_of(message: str) -> str | None:
    """``SamplingParams`` / engine messages start with the field name: "max_tokens must be ..."."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head.isidentifier() else None


def bad_value(error: ValueError) -> ApiError:
    """A ``ValueError`` of ``SamplingParams`` or a worker's refusal, as a 400 naming its field."""
    return ApiError(400, str(error), param=param_of(str(error)))


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500
                                       else "server_error"), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
