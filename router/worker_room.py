"""Holding requests while every worker is full (``RouterConfig.max_open_per_worker``).

With a limit set, a request that finds every healthy worker with that many open requests (this
router's in flight, or the worker's own running + waiting report, whichever is larger) waits here, in
the router, up to ``wait_s`` for one to have room. Held at the router, it goes to whichever worker
frees first, or to a replica the autoscaler just started; queued on a worker, it would wait behind
that worker's batch, and a burst piled onto the replicas already up would stretch every running
request's inter-token latency. The limit is soft: requests that find room at the same moment may
all take it before the next load report.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class WorkerRoom:
    """``has_room``: some healthy worker is below the limit; ``has_worker``: some healthy worker at all
    (with none, there is nothing to wait for: placement answers its own 503 at once)."""

    def __init__(self, limit: int, has_room: Callable[[], bool], has_worker: Callable[[], bool], wait_s: float, *,
                 poll_s: float = 0.02) -> None:
        if limit < 0 or not wait_s > 0 or not poll_s > 0:
            raise ValueError(f"limit must be >= 0 and wait_s, poll_s > 0, got {limit}, {wait_s}, {poll_s}")
        self.limit, self.has_room, self.has_worker = limit, has_room, has_worker
        self.wait_s, self.poll_s = wait_s, poll_s
        self.held = 0  # requests waiting for room now

    def _free(self) -> bool:
        return self.limit == 0 or self.has_room() or not self.has_worker()

    async def wait(self) -> bool:
        """At once if there is no limit, a worker has room, or none is healthy; else wait up to ``wait_s``
        -> False only when workers stayed full all that time."""
        if self._free():
            return True
        self.held += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_s
            while not self._free() and loop.time() < deadline:
                await asyncio.sleep(self.poll_s)  # releases and load polls change what has_room sees
            return self._free()
        finally:
            self.held -= 1
