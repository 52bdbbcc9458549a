"""``RouterContext``: what one app's endpoints share (no module state: several apps live in one process)."""

from __future__ import annotations

import asyncio
from typing import Callable, Coroutine

from .admission import Admission
from .cold_start import ColdStart, OnDemand
from .config import RouterConfig
from .errors import ApiError
from .metrics import RouterMetrics
from .tokenization import RouterTokenizer
from .worker_pool import WorkerPool
from .worker_room import WorkerRoom


class RouterContext:
    """Config, pool, tokenizer, metrics, the injected clock, admission, and the app's background tasks."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, tok: RouterTokenizer, metrics: RouterMetrics,
                 clock: Callable[[], float], on_demand: OnDemand | None = None) -> None:
        self.config, self.pool, self.tok, self.metrics, self.clock = config, pool, tok, metrics, clock
        self.cold_start = ColdStart(config.cold_start_wait_s, pool.has_healthy, on_demand)
        self.room = WorkerRoom(pool.max_open_per_worker, pool.has_room, pool.has_healthy, config.queue_timeout_s)
        self.admission = Admission(config.max_concurrent_requests, config.max_waiting_requests,
                                   config.queue_timeout_s, config.retry_after_s, metrics)
        self._tasks: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones
        # The host's lifecycle: "starting" (not ready yet), "serving", "draining" (no new requests).
        # An app without a RouterHost (tests, in-process use) serves from the start.
        self.phase = "serving"
        self._active: set = set()  # the generations admitted and not yet finished

    # -- lifecycle (driven by RouterHost) ----------------------------------------------------------

    def check_accepting(self) -> None:
        """A new generation request while the host drains: 503, try another replica."""
        if self.phase == "draining":
            raise self.unavailable("the server is shutting down", code="server_shutting_down")

    def track(self, generation) -> None:
        self._active.add(generation)

    def untrack(self, generation) -> None:
        self._active.discard(generation)

    def num_active(self) -> int:
        return len(self._active)

    def interrupt_all(self, error: ApiError) -> int:
        """End every admitted generation with ``error`` (the drain deadline); -> how many."""
        active = list(self._active)
        for generation in active:
            generation.interrupt(error)
        return len(active)

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
