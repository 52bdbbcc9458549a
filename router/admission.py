"""Admission control: a bounded number of requests generate, a bounded FIFO line waits, the rest get 429.

Nothing waits without a bound: a full line answers 429 at once, and a place in line is held for at
most ``timeout_s`` (then 503). Both carry ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import ApiError
from .metrics import RouterMetrics


class Admission:
    """At most ``max_running`` requests generate; up to ``max_waiting`` more wait in FIFO order.

    A full queue answers 429 at once; a wait longer than ``timeout_s`` answers 503. A released slot is
    handed straight to the oldest waiter, so late arrivals cannot overtake the queue.
    """

    def __init__(self, max_running: int, max_waiting: int, timeout_s: float, retry_after: int,
                 metrics: RouterMetrics) -> None:
        self.max_running, self.max_waiting, self.timeout_s = max_running, max_waiting, timeout_s
        self.retry_after, self.metrics = retry_after, metrics
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot without waiting (nobody is in line); False when the caller must queue."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            self._publish()
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line while none is free; every ``acquire`` needs one ``release``."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_waiting:
            raise ApiError(429, f"the router is at its limit of {self.max_running} concurrent requests "
                                f"(max_concurrent_requests) with {len(self._waiters)} waiting "
                                f"(max_waiting_requests); retry later", code="too_many_requests",
                           retry_after=self.retry_after)
        await self._wait_in_line()

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to this waiter; running stays the same
                self._publish()
                return
        self.running -= 1
        self._publish()

    async def _wait_in_line(self) -> None:
        """Wait until :meth:`release` hands this waiter a slot, or give up after ``timeout_s`` (503)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApiError(503, f"no concurrency slot freed within {self.timeout_s} s (queue_timeout_s)",
                           code="queue_timeout", retry_after=self.retry_after) from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
            self._publish()

    def _publish(self) -> None:
        self.metrics.in_flight.set(self.running)
        self.metrics.queue_depth.set(len(self._waiters))
