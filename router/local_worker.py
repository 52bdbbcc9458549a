"""``LocalWorker``: a ``WorkerHandle`` over an in-process ``AsyncEngine`` (tests, single-process serving).

It adds no transport, so it shows what the router needs of any worker: the engine's own
``generate``/``prefill``/``abort``/``load``/``info``/KV subscription, plus a refusal
(``WorkerUnavailable``) once the engine's loop has stopped, where a call would otherwise wait forever.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

from shoal.workers.protocol import GenerateRequest, KVEventBatch, KVHandle, TokenDelta, WorkerInfo, WorkerLoad

from .worker_pool import WorkerUnavailable

if TYPE_CHECKING:  # the engine pulls in torch; the router module itself must not
    from shoal.workers.async_engine import AsyncEngine


class LocalWorker:
    def __init__(self, engine: "AsyncEngine", worker_id: str | None = None, owns_engine: bool = False,
                 max_silence_s: float = 30.0) -> None:
        self.engine = engine
        self.worker_id = worker_id or engine.worker_id
        self.owns_engine = owns_engine  # close() shuts the engine down only if this worker owns it
        self.max_silence_s = max_silence_s

    def _check_alive(self) -> None:
        if not self.engine.alive(self.max_silence_s):
            raise WorkerUnavailable(self.worker_id, "the engine loop is not running"
                                    + (f" ({self.engine.last_error})" if self.engine.last_error else ""))

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        self._check_alive()
        async for delta in self.engine.generate(req):  # leaving early aborts it on the engine
            yield delta

    async def prefill(self, req: GenerateRequest) -> KVHandle:
        """The engine's prefill (prefill-role engines); cancelling the await aborts it there."""
        self._check_alive()
        return await self.engine.prefill(req)

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def get_load(self) -> WorkerLoad:
        self._check_alive()
        return self.engine.load()

    async def get_info(self) -> WorkerInfo:
        info = self.engine.info()
        if info.worker_id != self.worker_id:
            info = WorkerInfo(self.worker_id, info.model, info.block_size, info.max_model_len, info.role,
                              info.tensor_parallel_size)
        return info

    async def get_metrics(self) -> str:
        # render() waits (bounded) for the engine thread to refresh the gauges: not on this loop
        return (await asyncio.to_thread(self.engine.metrics.render)).decode()

    async def health(self) -> bool:
        return self.engine.alive(self.max_silence_s)

    async def kv_events(self) -> AsyncIterator[KVEventBatch]:
        self._check_alive()
        sub = self.engine.subscribe_kv_events()
        try:
            async for batch in sub:
                yield batch
        finally:
            sub.close()

    async def close(self) -> None:
        if self.owns_engine:
            await asyncio.to_thread(self.engine.shutdown)

    def __repr__(self) -> str:
        return f"LocalWorker({self.worker_id!r})"
