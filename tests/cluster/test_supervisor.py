"""``WorkerSupervisor``'s rules with time injected: a dead worker leaves the pool and comes back
after a backoff that doubles while it keeps failing and starts over once it ran stably; a worker
that stops answering health checks is killed (and so restarted); one still loading is not judged.

The processes are stand-ins with ``WorkerProcess``'s surface (the real ones are exercised end to
end by tests/cluster/test_serve_lifecycle.py); the pool is the router's real ``WorkerPool``."""

from __future__ import annotations

import asyncio

from shoal.cluster.supervisor import WorkerSupervisor
from shoal.cluster.worker_process import WorkerStartError
from shoal.router.placement import make_policy
from shoal.router.worker_pool import WorkerPool


CHECK_S = 0.5


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    def __init__(self, worker_id: str, fail_starts: int = 0):
        self.worker_id, self.fail_starts = worker_id, fail_starts
        self.running, self.starts, self.killed = True, 0, 0
        self.returncode = None

    def alive(self) -> bool:
        return self.running

    def die(self, code: int = -9) -> None:
        self.running, self.returncode = False, code

    def start(self) -> None:
        self.starts += 1

    def wait_ready(self, timeout_s: float) -> str:
        if self.fail_starts:
            self.fail_starts -= 1
            raise WorkerStartError(f"worker {self.worker_id} failed to start: boom")
        self.running, self.returncode = True, None
        return f"127.0.0.1:{9000 + self.starts}"

    def kill(self) -> None:
        self.killed += 1
        self.die()

    def stop(self) -> None:
        self.die(0)


class Handle:
    def __init__(self, worker_id: str, endpoint: str):
        self.worker_id, self.endpoint = worker_id, endpoint

    async def close(self) -> None:
        pass


def make(processes, clock, **kw):
    pool = WorkerPool(make_policy("round_robin"), clock=clock)
    for p in processes:
        pool.add(Handle(p.worker_id, "127.0.0.1:9000"))
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        # A backoff sleep moves the clock; the check interval does not (the test moves time itself).
        sleeps.append(s)
        if s != CHECK_S:
            clock.now += s
        await asyncio.sleep(0)

    said: list[str] = []
    sup = WorkerSupervisor(processes, pool, Handle, clock=clock, sleep=sleep, say=said.append,
                           check_interval_s=CHECK_S, **kw)
    return pool, sup, sleeps, said


async def settle(condition, turns: int = 2000) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the supervisor did not get there")


def test_a_dead_worker_leaves_the_pool_and_rejoins_after_a_doubling_backoff():
    asyncio.run(_dead_worker())


async def _dead_worker():
    clock, proc = Clock(), FakeProcess("w0", fail_starts=2)
    pool, sup, sleeps, said = make([proc], clock, backoff_s=1.0, max_backoff_s=30.0, stable_s=60.0)
    sup.start()
    try:
        proc.die()
        await settle(lambda: pool.state("w0") is None)  # out of placement at once
        await settle(lambda: pool.state("w0") is not None)  # back after two failed starts
        assert [s for s in sleeps if s != CHECK_S] == [1.0, 2.0, 4.0]  # doubling while it keeps failing
        assert pool.state("w0").handle.endpoint == "127.0.0.1:9003" and sup.restarts("w0") == 1
        assert "shoal serve: worker w0 exited (code -9); restarting in 1 s" in said
        clock.now += 61  # a stable run: the next failure starts from the first backoff again
        del sleeps[:]
        proc.die()
        await settle(lambda: pool.state("w0") is None)
        await settle(lambda: pool.state("w0") is not None)
        assert [s for s in sleeps if s != CHECK_S] == [1.0]
    finally:
        await sup.stop()


def test_a_worker_silent_past_the_hang_timeout_is_killed_and_restarted():
    asyncio.run(_hung_worker())


async def _hung_worker():
    clock, proc = Clock(), FakeProcess("w0")
    pool, sup, _, said = make([proc], clock, hang_timeout_s=5.0)
    state = pool.state("w0")
    sup.start()
    try:
        for _ in range(50):  # never answered yet (loading): not judged, however long
            await asyncio.sleep(0)
        assert proc.killed == 0
        state.last_healthy_at = clock.now
        clock.now += 4.9
        for _ in range(50):
            await asyncio.sleep(0)
        assert proc.killed == 0  # within the timeout
        clock.now += 0.2
        await settle(lambda: proc.killed == 1)
        await settle(lambda: pool.state("w0") is not None and pool.state("w0") is not state)
        assert any("answered no health check for 5 s" in line for line in said)
    finally:
        await sup.stop()
