"""``RouterContext``: what one app's endpoints share (no module state: several apps live in one process)."""

from __future__ import annotations

import asyncio
from typing import Callable, Coroutine

from .admission import Admission
from .config import RouterConfig
from .errors import ApiError
from .metrics import RouterMetrics
from .tokenization import RouterTokenizer
from .worker_pool import WorkerPool


class RouterContext:
    """Config, pool, tokenizer, metrics, the injected clock, admission, and the app's background tasks."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, tok: RouterTokenizer, metrics: RouterMetrics,
                 clock: Callable[[], float]) -> None:
        self.config, self.pool, self.tok, self.metrics, self.clock = config, pool, tok, metrics, clock
        self.admission = Admission(config.max_concurrent_requests, config.max_waiting_requests,
                                   config.queue_timeout_s, config.retry_after_s, metrics)
        self._tasks: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def unavailable(self, message: str, code: str = "worker_unavailable") -> ApiError:
        """A 503 the client may retry after ``retry_after_s``."""
        return ApiError(503, message, code=code, retry_after=self.config.retry_after_s)

    def no_worker_error(self) -> ApiError:
        return self.unavailable("no healthy worker is available", code="no_healthy_worker")

    def model_names(self) -> list[str]:
        if self.config.served_model_name:
            return [self.config.served_model_name]
        return self.pool.model_names()
