"""``AsyncEngine``: an ``LLMEngine``'s step loop on its own thread, driven from asyncio.

The RPC server (or an in-process router) stays responsive however long a step takes: callers only
touch thread-safe queues. Token ids go out, text stays with the caller (the router detokenizes).
Commands (add, abort, subscribe) are applied at the top of each loop turn, so an abort takes effect
within one engine step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .engine.block_pool import KVEvent
from .engine.outputs import EngineCoreOutput
from .engine.request import Request, RequestStatus
from .llm_engine import LLMEngine
from .protocol import GenerateRequest, KVEventBatch, TokenDelta, TokenLogprob, WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone; nobody is listening any more
            pass


class KVSubscription:
    """An async iterator of ``KVEventBatch``: a snapshot first, then deltas with consecutive ``seq``."""

    def __init__(self, engine: "AsyncEngine", stream: _Stream):
        self._engine, self._stream = engine, stream

    def __aiter__(self):
        return self

    async def __anext__(self) -> KVEventBatch:
        item = await self._stream.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._engine._commands.put(("unsubscribe", self._stream))


class AsyncEngine:
    def __init__(self, engine: LLMEngine, worker_id: str = "worker-0", role: str = "unified",
                 idle_wait_s: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.worker_id = worker_id
        self.role = role
        self._idle_wait = idle_wait_s
        self._clock = clock
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # request id -> its caller's queue (engine thread only)
        self._subscribers: list[_Stream] = []
        self._kv_seq = 0
        self._heartbeat = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shoal-engine-{worker_id}", daemon=True)
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.engine.shutdown()  # tensor-parallel rank processes, if any

    def alive(self, max_silence_s: float = 30.0) -> bool:
        """The loop thread runs and has turned recently (a wedged step shows here, not in the server)."""
        return self._thread.is_alive() and self._clock() - self._heartbeat < max_silence_s

    # -- requests -------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas; leaving the iteration early aborts it on the engine."""
        if req.sampling.n != 1:
            raise ValueError(f"a worker runs one completion per request: n must be 1, got {req.sampling.n}")
        self.engine.validate(req.prompt_token_ids, req.sampling)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", (req, stream)))
        finished = False
        try:
            while True:
                delta: TokenDelta = await stream.queue.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def subscribe_kv_events(self) -> KVSubscription:
        if not self.engine.config.kv_events:
            raise ValueError("this engine does not record KV events (EngineConfig.kv_events=False)")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("subscribe", stream))
        return KVSubscription(self, stream)

    def load(self) -> WorkerLoad:
        sched = self.engine.scheduler
        kv = self.engine.kv_cache
        return WorkerLoad(
            num_running=len(sched.running), num_waiting=len(sched.waiting) + self._commands.qsize(),
            kv_usage=kv.usage(), num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.pool.num_blocks,
            num_prefix_queries=sched.stats.num_prefix_queries, num_prefix_hits=sched.stats.num_prefix_hits)

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, model=self.engine.config.model,
                          block_size=self.engine.config.block_size, max_model_len=self.engine.max_model_len,
                          role=self.role)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        core = self.engine.core
        while not self._stop.is_set():
            self._heartbeat = self._clock()
            self._apply_commands(block=not core.has_unfinished_requests())
            if not core.has_unfinished_requests():
                continue
            try:
                outputs = core.step()
            except Exception as e:  # a broken step ends its requests with an error, never a hang
                log.exception("engine step failed")
                self.last_error = f"{type(e).__name__}: {e}"
                self._fail_all(self.last_error)
                continue
            self._deliver(outputs)
            self._publish_kv_events()
        self._fail_all("engine shut down")
        for sub in self._subscribers:
            sub.put(None)

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, arg) -> None:
        if kind == "add":
            req, stream = arg
            if req.request_id in self._streams or req.request_id in self.engine.scheduler.requests:
                stream.put(TokenDelta(req.request_id, (), finish_reason="error",
                                      error=f"request_id {req.request_id!r} is already running"))
                return
            self._streams[req.request_id] = stream
            self.engine.core.add_request(Request(req.request_id, req.prompt_token_ids, req.sampling,
                                                 self.engine.eos_token_ids, req.priority))
        elif kind == "abort":
            self.engine.core.finish_requests([arg], RequestStatus.FINISHED_ABORTED)
            stream = self._streams.pop(arg, None)
            if stream is not None:
                stream.put(TokenDelta(arg, (), finish_reason="abort"))
        elif kind == "subscribe":
            self._publish_kv_events()  # flush pending deltas to older subscribers first
            arg.put(KVEventBatch(self._kv_seq, "snapshot", self.engine.kv_cache.pool.snapshot()))
            self._subscribers.append(arg)
        elif kind == "unsubscribe":
            if arg in self._subscribers:
                self._subscribers.remove(arg)

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            logprobs = tuple(TokenLogprob(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in out.new_logprobs)
            stop = out.stop_reason if isinstance(out.stop_reason, int) else None
            stream.put(TokenDelta(out.request_id, out.new_token_ids, logprobs, out.finish_reason, stop,
                                  out.num_cached_tokens))
            if out.finish_reason is not None:
                del self._streams[out.request_id]

    def _publish_kv_events(self) -> None:
        events: list[KVEvent] = self.engine.kv_cache.pool.take_events()
        if not events:
            return
        batches: list[KVEventBatch] = []
        for ev in events:  # merge runs of the same kind, keeping order
            if batches and batches[-1].kind == ev.kind:
                last = batches.pop()
                batches.append(KVEventBatch(last.seq, ev.kind, last.block_hashes + ev.block_hashes))
            else:
                self._kv_seq += 1
                batches.append(KVEventBatch(self._kv_seq, ev.kind, ev.block_hashes))
        for sub in self._subscribers:
            for batch in batches:
                sub.put(batch)

    def _fail_all(self, error: str) -> None:
        ids = list(self._streams)
        self.engine.core.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        for rid in ids:
            self._streams.pop(rid).put(TokenDelta(rid, (), finish_reason="error", error=error))
