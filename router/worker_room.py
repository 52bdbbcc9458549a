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
    def __init__(self, limit: int, has_room: Callable[[], bool], wait_s: float, *, poll_s: float = 0.02) -> None:
        if limit < 0 or not wait_s > 0 or not poll_s > 0:
            raise ValueError(f"limit must be >= 0 and wait_s, poll_s > 0, got {limit}, {wait_s}, {poll_s}")
        self.limit, self.has_room, self.wait_s, self.poll_s = limit, has_room, wait_s, poll_s
        self.held = 0  # requests waiting for room now

    async def wait(self) -> bool:
        """At once if there is no limit or a worker has room; else wait up to ``wait_s`` -> whether one has."""
        if self.limit == 0 or self.has_room():
            return True
        self.held += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_s
            while not self.has_room() and loop.time() < deadline:
                await asyncio.sleep(self.poll_s)  # releases and load polls change what has_room sees
            return self.has_room()
        finally:
            self.held -= 1
