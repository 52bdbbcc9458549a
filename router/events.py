"""``EventStream``: the one queue a generation's children put their ``Event``s on, read by the responder.

Every child ends with exactly one event that is ``finished`` or carries an ``error``; the stream knows
how many children are open and reads as ended (None) once all have ended, or once :meth:`end_with`'s
error (the host's drain deadline) has been read. It also keeps the request's token timing metrics
(time to first token, gaps between one choice's deltas), since it sees every delta first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .choice import Choice, Event

if TYPE_CHECKING:
    from .context import RouterContext


class EventStream:
    def __init__(self, ctx: RouterContext, endpoint: str, arrival: float) -> None:
        self.ctx, self.endpoint, self.arrival = ctx, endpoint, arrival
        self.first_token_at: float | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._open = 0
        self._ending = False  # end_with() was called: its error is the last event read

    def expect(self, children: int) -> None:
        self._open += children

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def put(self, event: Event) -> None:
        self._queue.put_nowait(event)

    def end_with(self, event: Event) -> None:
        """End the stream with ``event`` (an error) after what is queued, unless every child ended first."""
        if self._open > 0 and not self._ending:
            self._ending = True
            self._queue.put_nowait(event)

    async def next(self, deadline: float) -> Event | None:
        """The next event; None once all children have ended. Raises ``TimeoutError`` past ``deadline``."""
        if self._open == 0:
            return None
        # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that races an event already
        # taken off the queue, and a client's disconnect then leaves its request running.
        async with asyncio.timeout(max(deadline - self.ctx.clock(), 0.0)):
            event = await self._queue.get()
        if event.finished or event.error is not None:
            self._open -= 1
            if self._ending and event.error is not None:
                self._open = 0
        return event

    def on_tokens(self, choice: Choice, count: int) -> None:
        """Time to first token (of the request) and gaps between one choice's deltas."""
        now, metrics = self.ctx.clock(), self.ctx.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.labels(self.endpoint).observe(now - self.arrival)
        elif choice.last_token_at is not None:
            metrics.inter_token.labels(self.endpoint).observe(now - choice.last_token_at)
        choice.last_token_at = now
        metrics.generation_tokens.inc(count)
