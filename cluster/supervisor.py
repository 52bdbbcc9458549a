"""``WorkerSupervisor``: keeps ``shoal serve``'s worker processes running, and the router's pool in step.

A worker process that exits (killed, crashed, OOM) is reaped at once (no zombie), leaves placement
(its handle is removed, so the streams still reading from it end with an error the router turns
into a 503 body or an SSE error event), and is started again after a backoff that doubles on each
failure in a row (``backoff_s`` up to ``max_backoff_s``; a worker that then stays up for
``stable_s`` starts the count over). Once the new process is ready it rejoins the pool under the
same worker id on its new port.

A worker that still runs but has answered no health poll for ``hang_timeout_s`` (SIGSTOPped, wedged
in native code, swapping to death) is killed, and so takes the same path. Only a worker that has
answered since it (re)joined is judged, so loading never counts as hanging.

The supervisor owns no process state of its own: ``WorkerProcess`` is the process, ``WorkerPool``
the router's view; this only connects the two. Time and sleeping are injected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .worker_process import WorkerProcess, WorkerStartError

log = logging.getLogger(__name__)


@dataclass
class _Record:
    process: WorkerProcess
    failures: int = 0  # exits in a row without a stable run between them
    started_at: float = 0.0
    restarts: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)


class WorkerSupervisor:
    def __init__(self, workers: list[WorkerProcess], pool, make_handle: Callable[[str, str], object], *,
                 start_timeout_s: float = 600.0, hang_timeout_s: float | None = 60.0,
                 check_interval_s: float = 0.2, backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 say: Callable[[str], None] = print) -> None:
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError(f"backoff_s must be in (0, max_backoff_s={max_backoff_s}], got {backoff_s}")
        self.pool, self.make_handle = pool, make_handle
        if hang_timeout_s is not None and hang_timeout_s <= 0:
            raise ValueError(f"hang_timeout_s must be > 0 or None, got {hang_timeout_s}")
        self.start_timeout_s, self.hang_timeout_s, self.check_interval_s = start_timeout_s, hang_timeout_s, check_interval_s
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self._clock, self._sleep, self._say = clock, sleep, say
        now = clock()
        self._records = {w.worker_id: _Record(w, started_at=now) for w in workers}
        self._task: asyncio.Task | None = None

    def start(self) -> "WorkerSupervisor":
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def restarts(self, worker_id: str) -> int:
        return self._records[worker_id].restarts

    async def stop(self) -> None:
        """Stop watching and cancel restarts in progress (a half-started process is stopped)."""
        tasks = [t for t in (self._task, *(r.task for r in self._records.values())) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _watch(self) -> None:
        while True:
            for record in self._records.values():
                restarting = record.task is not None and not record.task.done()
                if restarting:
                    continue
                if not record.process.alive():  # alive() reaps an exited child
                    record.task = asyncio.get_running_loop().create_task(self._replace(record))
                elif self._hung(record):
                    self._say(f"shoal serve: worker {record.process.worker_id} answered no health check for "
                              f"{self.hang_timeout_s:g} s (--hang-timeout); killing it")
                    record.process.kill()
            await self._sleep(self.check_interval_s)

    def _hung(self, record: _Record) -> bool:
        if self.hang_timeout_s is None:
            return False
        state = self.pool.state(record.process.worker_id)
        if state is None or state.last_healthy_at is None:  # not in the pool, or never answered yet
            return False
        return self.pool.clock() - state.last_healthy_at > self.hang_timeout_s

    async def _replace(self, record: _Record) -> None:
        worker = record.process
        code = worker.returncode
        await self.pool.remove_worker(worker.worker_id)  # its open streams fail now, not at a timeout
        if self._clock() - record.started_at >= self.stable_s:
            record.failures = 0
        delay = min(self.backoff_s * 2 ** record.failures, self.max_backoff_s)
        record.failures += 1
        self._say(f"shoal serve: worker {worker.worker_id} exited (code {code}); restarting in {delay:g} s")
        await self._sleep(delay)
        try:
            worker.start()
            endpoint = await asyncio.to_thread(worker.wait_ready, self.start_timeout_s)
        except asyncio.CancelledError:
            await asyncio.to_thread(worker.stop)
            raise
        except WorkerStartError as e:
            log.debug("%s", e)  # the log tail; the user gets the summary line
            self._say(f"shoal serve: worker {worker.worker_id} failed to restart: {e.summary}")
            return  # still dead: the next check schedules another try, with a longer backoff
        record.started_at = self._clock()
        record.restarts += 1
        self.pool.add(self.make_handle(worker.worker_id, endpoint))
        self._say(f"shoal serve: worker {worker.worker_id} is back on {endpoint}")
