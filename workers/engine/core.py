"""The engine step: schedule, run, update. Nothing else happens in it.

With ``async_scheduling`` the step overlaps the host with the device: schedule step N+1 (its
requests' in-flight tokens are placeholders), submit it, and only then collect step N and apply its
tokens, while the device runs N+1. At most one step is in flight between two calls of ``step``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Protocol

from .outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler


class InFlightStep(Protocol):
    def collect(self) -> ModelRunnerOutput: ...


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...


class AsyncExecutor(Executor, Protocol):
    def submit(self, sched: SchedulerOutput) -> InFlightStep: ...


@dataclass
class StepTimes:
    """Wall seconds spent in each part of the step, summed since start (for profiles, not control)."""

    schedule_s: float = 0.0
    execute_s: float = 0.0  # async: submitting step N+1 plus collecting step N (the wait included)
    update_s: float = 0.0
    steps: int = 0


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock=time.perf_counter,
                 async_scheduling: bool = False):
        if async_scheduling and not hasattr(executor, "submit"):
            raise ValueError(f"async scheduling needs an executor with submit(); {type(executor).__name__} has none")
        if async_scheduling != scheduler.config.async_scheduling:
            raise ValueError("EngineCore and its scheduler must agree on async_scheduling")
        self.scheduler = scheduler
        self.executor = executor
        self.async_scheduling = async_scheduling
        self.times = StepTimes()
        self._clock = clock
        self._in_flight: tuple[SchedulerOutput, InFlightStep] | None = None

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(list(request_ids), status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        if self.async_scheduling:
            return self._step_overlapped()
        t0 = self._clock()
        sched = self.scheduler.schedule()
        t1 = self._clock()
        result = self.executor.execute(sched)
        t2 = self._clock()
        outputs = self.scheduler.update_from_output(sched, result)
        self._count(t1 - t0, t2 - t1, self._clock() - t2)
        return outputs

    def _step_overlapped(self) -> list[EngineCoreOutput]:
        """Schedule + submit N+1, then collect + update N: the tokens returned are step N's."""
        t0 = self._clock()
        sched = self.scheduler.schedule()
        t1 = self._clock()
        try:
            pending = self.executor.submit(sched)
            previous, self._in_flight = self._in_flight, (sched, pending)
            outputs: list[EngineCoreOutput] = []
            execute_s, t2 = self._clock() - t1, self._clock()
            if previous is not None:
                result = previous[1].collect()
                t3 = self._clock()
                execute_s, t2 = execute_s + t3 - t2, t3
                outputs = self.scheduler.update_from_output(previous[0], result)
            if sched.is_empty:  # nothing runs: settle it now, so an idle engine holds no step in flight
                self._in_flight = None
                outputs += self.scheduler.update_from_output(sched, pending.collect())
        except BaseException:
            self._in_flight = None
            self.scheduler.abandon_in_flight()
            raise
        self._count(t1 - t0, execute_s, self._clock() - t2)
        return outputs

    def reset_times(self) -> None:
        self.times = StepTimes()

    def _count(self, schedule_s: float, execute_s: float, update_s: float) -> None:
        t = self.times
        t.schedule_s += schedule_s
        t.execute_s += execute_s
        t.update_s += update_s
        t.steps += 1
