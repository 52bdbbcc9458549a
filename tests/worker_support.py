"""A real ``LocalWorker`` that keeps the request ids handed to it: tests check that a refused request
never reached a worker."""

from __future__ import annotations

from shoal.router.local_worker import LocalWorker


class RecordingWorker(LocalWorker):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.request_ids: list[str] = []

    def generate(self, req):
        self.request_ids.append(req.request_id)
        return super().generate(req)
