"""``StepWatch``: is an engine thread stuck, judged only by work it is actually doing (torch-free).

The engine thread calls :meth:`StepWatch.begin` when it starts a piece of work (applying commands,
one engine step) and :meth:`StepWatch.idle` before it blocks waiting for the next command. Only work
in progress can be stuck: a loop waiting idle for an hour is healthy, and so is a step that has run
for less than ``max_step_s`` however long the loop has been around. (A heartbeat stamped once per
loop turn reads both wrong: a long prefill step, or a turn that began long ago, looked dead.)

Reads and writes are single attribute stores, safe across threads without a lock; time is injected.
"""

from __future__ import annotations

import time
from typing import Callable

DEFAULT_MAX_STEP_S = 120.0  # a step (or command) running longer than this is taken for a wedged loop


class StepWatch:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None  # when the work in progress began; None while idle

    def begin(self) -> None:
        """The thread starts a piece of work now (a step, a batch of commands)."""
        self._since = self._clock()

    def idle(self) -> None:
        """The thread is about to wait for work: nothing in progress can be stuck."""
        self._since = None

    def busy_for(self) -> float:
        """Seconds the work in progress has run (0 while idle)."""
        since = self._since
        return 0.0 if since is None else max(self._clock() - since, 0.0)

    def stuck(self, max_step_s: float = DEFAULT_MAX_STEP_S) -> bool:
        """The work in progress has run longer than ``max_step_s``."""
        return self.busy_for() >= max_step_s
