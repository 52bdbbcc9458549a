"""Holding requests while a pool scaled to zero starts a replica (``RouterConfig.cold_start_wait_s``).

A request that finds no healthy worker waits up to ``wait_s`` for one instead of being answered 503 at
once. While any request is held, the injected ``on_demand(True)`` tells the autoscaler (through etcd,
``EtcdRouter``) that the pool has work; ``on_demand(False)`` once none is. A worker that turns healthy
releases every held request; one that does not come within ``wait_s`` leaves the request to the 503
with ``Retry-After`` its caller answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

OnDemand = Callable[[bool], Awaitable[None]]


class ColdStart:
    def __init__(self, wait_s: float, has_worker: Callable[[], bool], on_demand: OnDemand | None = None, *,
                 poll_s: float = 0.05) -> None:
        if wait_s < 0 or not poll_s > 0:
            raise ValueError(f"wait_s must be >= 0 and poll_s > 0, got {wait_s}, {poll_s}")
        self.wait_s, self.has_worker, self.on_demand, self.poll_s = wait_s, has_worker, on_demand, poll_s
        self.held = 0  # requests waiting for a worker now
        self._signalled = False
        self._lock = asyncio.Lock()

    async def wait(self) -> bool:
        """Return at once if a worker is healthy or holding is off; else wait for one up to ``wait_s``.
        -> False only when it held the request and no worker came (holding off: True, and placement
        answers its own 503)."""
        if self.wait_s <= 0 or self.has_worker():
            return True
        self.held += 1
        try:
            await self._sync()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_s
            while not self.has_worker() and loop.time() < deadline:
                await asyncio.sleep(self.poll_s)  # the pool's health polls change what has_worker sees
            return self.has_worker()
        finally:
            self.held -= 1
            await self._sync()

    async def _sync(self) -> None:
        """Bring the signalled demand in line with ``held`` (serialized: the last change wins)."""
        if self.on_demand is None:
            return
        async with self._lock:
            want = self.held > 0
            if want == self._signalled:
                return
            try:
                await self.on_demand(want)
                self._signalled = want
            except Exception as e:  # noqa: BLE001 - etcd away: the request still waits its bound
                log.warning("signalling demand (%s) failed: %s: %s", want, type(e).__name__, e)
