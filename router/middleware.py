"""``CountRequests``: the ``requests`` counter by endpoint and status, streams included."""

from __future__ import annotations

from .metrics import RouterMetrics


class CountRequests:
    """Pure ASGI middleware: count requests by route and status (streams count when they end)."""

    _ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions",
               "/v1/models": "models", "/tokenize": "tokenize", "/detokenize": "detokenize",
               "/health": "health", "/ready": "ready", "/metrics": "metrics"}

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
