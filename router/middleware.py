"""Pure ASGI middleware of the router app, outermost first (``create_app`` installs them so):

    CORSMiddleware   Starlette's, with RouterConfig's CORS options (preflights never need the key)
    RequestContext   the request id (``X-Request-Id``: the client's if well-formed, else a new one),
                     echoed on every answer; one access-log line when the answer has been sent in full
    CountRequests    the ``requests`` counter by endpoint and status, streams included
    RequireApiKey    ``Authorization: Bearer <api_key>`` on everything but the open paths (401)

Pure ASGI rather than ``BaseHTTPMiddleware``: a stream's end (and so its log line and count) is when
the inner app returns, and nothing buffers or re-wraps the body.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Callable

from .metrics import RouterMetrics
from .openai_protocol import error_body

access_log = logging.getLogger("shoal.router.access")

# A client's id is used as given only when it is short and plain (it goes into logs, headers and
# worker request ids); anything else is replaced by a generated one.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(scope) -> str | None:
    """The request id ``RequestContext`` gave this request (None outside it)."""
    record = scope.get("state", {}).get("access")
    return record.request_id if record is not None else None


class AccessRecord:
    """What one request's access-log line says beyond the HTTP status: filled by the endpoint.

    ``from_client``: the id came from the client's ``X-Request-Id`` (it may repeat, so a worker request
    id built from it needs a unique suffix). ``usage``: a callable giving (prompt, completion) tokens,
    read when the line is written (a stream's counts are final only then).
    """

    __slots__ = ("request_id", "from_client", "usage")

    def __init__(self, request_id: str, from_client: bool) -> None:
        self.request_id, self.from_client = request_id, from_client
        self.usage: Callable[[], tuple[int, int]] | None = None


def access_record(scope) -> AccessRecord | None:
    return scope.get("state", {}).get("access")


class RequestContext:
    """Request id in, ``X-Request-Id`` out, and one access-log line per request ("off" | "text" | "json")."""

    def __init__(self, app, log_format: str = "text", clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.log_format, self.clock = app, log_format, clock

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        from_client = given is not None and _CLIENT_ID.fullmatch(given) is not None
        record = AccessRecord(given if from_client else uuid.uuid4().hex, from_client)
        # uvicorn gives each request its own copy of the lifespan state: this write stays per request.
        scope.setdefault("state", {})["access"] = record
        header = (b"x-request-id", record.request_id.encode())
        status, start = 500, self.clock()  # 500: what a request is if it fails before answering

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.log_format != "off":
                self._log(scope, record, status, (self.clock() - start) * 1000)

    def _log(self, scope, record: AccessRecord, status: int, latency_ms: float) -> None:
        prompt, completion = record.usage() if record.usage is not None else (None, None)
        line = {"method": scope.get("method"), "path": scope.get("path"), "status": status,
                "request_id": record.request_id, "prompt_tokens": prompt, "completion_tokens": completion,
                "latency_ms": round(latency_ms, 1)}
        if self.log_format == "json":
            access_log.info(json.dumps(line))
        else:
            access_log.info("%(method)s %(path)s %(status)s request_id=%(request_id)s prompt_tokens=%(prompt_tokens)s "
                            "completion_tokens=%(completion_tokens)s latency_ms=%(latency_ms)s", line)


class RequireApiKey:
    """401 (OpenAI's ``invalid_api_key`` body) unless ``Authorization: Bearer <key>``; ``open_paths`` are
    exempt (liveness, readiness and metrics probes carry no key). The compare takes the same time
    wherever a wrong key differs, so timing does not leak the key."""

    def __init__(self, app, api_key: str, open_paths: frozenset[str]) -> None:
        self.app, self.expected, self.open_paths = app, f"Bearer {api_key}".encode(), open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is not None and hmac.compare_digest(given.encode(), self.expected):
            await self.app(scope, receive, send)
            return
        why = "no API key was given" if given is None else "the API key is not valid"
        body = json.dumps(error_body(f"{why}: send it as the header `Authorization: Bearer <key>`",
                                     code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class CountRequests:
    """Pure ASGI middleware: count requests by route and status (streams count when they end)."""

    _ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions",
               "/v1/responses": "responses",
               "/v1/models": "models", "/tokenize": "tokenize", "/detokenize": "detokenize",
               "/health": "health", "/ready": "ready", "/metrics": "metrics", "/version": "version"}

    def __init__(self, app, metrics: RouterMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what a request counts as if it fails before its response starts

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = self._ROUTES.get(scope.get("path", ""), "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()
