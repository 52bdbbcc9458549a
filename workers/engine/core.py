"""The engine step: schedule, run, update. Nothing else happens in it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Protocol

from .outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...


@dataclass
class StepTimes:
    """Wall seconds spent in each part of the step, summed since start (for profiles, not control)."""

    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0
    steps: int = 0


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock=time.perf_counter):
        self.scheduler = scheduler
        self.executor = executor
        self.times = StepTimes()
        self._clock = clock

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(list(request_ids), status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        t0 = self._clock()
        sched = self.scheduler.schedule()
        t1 = self._clock()
        result = self.executor.execute(sched)
        t2 = self._clock()
        outputs = self.scheduler.update_from_output(sched, result)
        t = self.times
        t.schedule_s, t.execute_s, t.update_s = t.schedule_s + t1 - t0, t.execute_s + t2 - t1, t.update_s + self._clock() - t2
        t.steps += 1
        return outputs
