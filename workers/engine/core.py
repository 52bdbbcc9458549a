"""The engine step: schedule, run, update. Nothing else happens in it."""

from __future__ import annotations

from typing import Iterable, Protocol

from .outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from .request import Request, RequestStatus
from .scheduler import Scheduler


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor):
        self.scheduler = scheduler
        self.executor = executor

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(list(request_ids), status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        result = self.executor.execute(sched)
        return self.scheduler.update_from_output(sched, result)
