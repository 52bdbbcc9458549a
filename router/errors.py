"""Every answer other than 200 is an OpenAI-style error body: ``ApiError`` and the app's handlers.

Code raises ``ApiError(status, message, param=...)`` wherever it finds the problem; the handlers
installed by :func:`add_error_handlers` turn it, and anything FastAPI or Starlette raise, into
``{"error": {"message", "type", "param", "code"}}`` with the right status (and ``Retry-After`` on
429 / 503), so a client never sees a framework's own error shape.
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.workers.engine.sampling_params import InvalidParam

from .middleware import request_id_of
from .openai_protocol import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200, as an OpenAI-style error body."""

    _TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
              408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
              503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: int | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self._TYPES.get(status, "server_error")
        self.retry_after = retry_after
        # An answer given before the body was read in full ends the connection: its unread rest
        # cannot be told apart from the next request.
        self.close = close

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        if self.close:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bad_value(error: ValueError, rename: Callable[[str], str] = lambda field: field) -> ApiError:
    """A ``ValueError`` of ``SamplingParams`` or a worker's refusal, as a 400. An ``InvalidParam``
    names its field as data (``rename`` maps it to the request's own spelling); another ValueError
    (a refusal that crossed the wire as text) names none."""
    if isinstance(error, InvalidParam):
        param = rename(error.field)
        return ApiError(400, error.renamed(param), param=param)
    return ApiError(400, str(error))


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
        rid = request_id_of(request.scope)
        log.exception("unhandled error on %s (request %s)", request.url.path, rid)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__} (request id {rid})", "server_error"),
                            status_code=500)
