"""``AsyncEngine``: the asyncio facade over an ``LLMEngine`` whose step loop runs on its own thread.

The RPC servicer (or an in-process router) stays responsive however long a step takes: callers only
hand commands (``workers/engine_commands.py``) to the ``EngineThread`` (``workers/engine_thread.py``)
and await their own queues. Token ids go out, text stays with the caller (the router detokenizes).
The disaggregation roles (``workers/disagg.py``) are built here on first use and reach the engine
through the method set of ``EngineAccess``, which this class offers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable

from .aio import LoopQueue
from .disagg import DecodeSide, DisaggConfig, PrefillSide
from .engine.sampling_params import SamplingParams
from .engine_commands import Abort, AddRequest, Call, Exported, Reply, Subscribe, Unsubscribe
from .engine_thread import EngineThread
from .kv_exports import ExportTable
from .heartbeat import DEFAULT_MAX_STEP_S
from .llm_engine import LLMEngine
from .protocol import GenerateRequest, KVEventBatch, KVHandle, TokenDelta, WorkerInfo, WorkerLoad

_PREFILL_ONLY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

log = logging.getLogger(__name__)


class KVSubscription:
    """An async iterator of ``KVEventBatch``: a snapshot first, then deltas with consecutive ``seq``."""

    def __init__(self, thread: EngineThread, stream: LoopQueue):
        self._thread, self._stream = thread, stream

    def __aiter__(self):
        return self

    async def __anext__(self) -> KVEventBatch:
        item = await self._stream.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._thread.submit(Unsubscribe(self._stream))


class AsyncEngine:
    def __init__(self, engine: LLMEngine, worker_id: str = "worker-0", role: str = "unified",
                 idle_wait_s: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 disagg: DisaggConfig | None = None):
        self.engine = engine
        self.disagg_config = disagg or DisaggConfig()
        self.endpoint = ""  # host:port peers reach this worker's gRPC server at (set by the server)
        self.worker_id = worker_id
        self.role = role
        self.num_kv_fallbacks = 0  # kv_source requests whose pull failed: the prefill ran here
        self._thread = EngineThread(engine, f"shoal-engine-{worker_id}", export_ttl_s=self.disagg_config.export_ttl_s,
                                    idle_wait_s=idle_wait_s, clock=clock)
        self._prefill_side: PrefillSide | None = None
        self._decode_side: DecodeSide | None = None
        self._kv_sink = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._thread.stop(timeout)
        if self._prefill_side is not None:
            self._prefill_side.close()
        self.engine.shutdown()  # tensor-parallel rank processes, if any

    def alive(self, max_step_s: float = DEFAULT_MAX_STEP_S) -> bool:
        """The loop thread runs and no step (or command) of it has run for ``max_step_s``: an idle loop
        is alive however long it waits, and so is a long step within the bound (a wedged step shows
        here, not in the server; see ``heartbeat.StepWatch``)."""
        return self._thread.alive(max_step_s)

    @property
    def running(self) -> bool:
        """The loop thread runs (however long its current step takes)."""
        return self._thread.running

    @property
    def last_error(self) -> str | None:
        """The error of the last engine step that failed (its requests ended with it)."""
        return self._thread.last_error

    @property
    def num_kv_subscribers(self) -> int:
        return self._thread.num_subscribers

    @property
    def metrics(self):
        """This engine's Prometheus series (``workers/metrics.py``); ``render()`` from any thread."""
        return self._thread.metrics

    # -- requests -------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas; leaving the iteration early aborts it on the engine."""
        if req.sampling.n != 1:
            raise ValueError(f"a worker runs one completion per request: n must be 1, got {req.sampling.n}")
        resolved = self.engine.resolve_params(req.sampling)
        if resolved is not req.sampling:
            req = dataclasses.replace(req, sampling=resolved)
        self.engine.validate(req.prompt_token_ids, req.sampling)
        if req.kv_source is not None:
            await self._import_kv(req)
        stream = LoopQueue()
        self._thread.submit(AddRequest(req, stream))
        finished = False
        try:
            while True:
                delta: TokenDelta = await stream.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._thread.submit(Abort(request_id))

    def subscribe_kv_events(self) -> KVSubscription:
        if not self.engine.config.kv_events:
            raise ValueError("this engine does not record KV events (EngineConfig.kv_events=False)")
        stream = LoopQueue()
        self._thread.submit(Subscribe(stream))
        return KVSubscription(self._thread, stream)

    # -- the engine-thread protocol (EngineAccess) ----------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any], undo: Callable[[Any], None] | None = None) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (block pool and executor are its alone).

        ``undo(result)`` runs on the engine thread instead of handing the result over if the caller is
        cancelled first (a reservation nobody will use must be given back, not leaked).
        """
        reply = Reply(undo)
        self._thread.submit(Call(fn, reply))
        try:
            while not reply.future.done():  # a loop that died never answers: do not wait forever
                await asyncio.wait({reply.future}, timeout=1.0)
                if not reply.future.done() and not self._thread.running:
                    raise RuntimeError("the engine loop is not running")
        except BaseException:
            if reply.abandon() and undo is not None:  # the engine thread already ran fn
                result = reply.result
                self._thread.submit(Call(lambda _: undo(result)))
            raise
        return reply.future.result()

    def call_soon(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Queue ``fn(engine)`` for the engine thread without waiting (from any thread)."""
        self._thread.submit(Call(fn))

    @property
    def exports(self) -> ExportTable:
        """Prompts pinned for a pull (engine thread only)."""
        return self._thread.exports

    @property
    def kv_block_io(self):
        return self.engine.kv_block_io

    @property
    def kv_sink(self):
        if self._kv_sink is None:
            from .executor.kv_transfer import KVSink

            self._kv_sink = KVSink.of_engine(self.engine)
        return self._kv_sink

    # -- disaggregated serving ------------------------------------------------------------------
    async def prefill(self, req: GenerateRequest) -> KVHandle:
        """Compute the prompt's KV blocks and pin its full ones for a pull (``DisaggConfig.export_ttl_s``).

        The request runs with one greedy token that is dropped (the decode worker samples the first
        real token, so seeded and greedy outputs equal a unified worker's). Cancelling aborts it.
        """
        self.engine.validate(req.prompt_token_ids, req.sampling)
        self._require_prefix_caching("prefill for another worker")
        stream = LoopQueue()
        self._thread.submit(AddRequest(GenerateRequest(req.request_id, req.prompt_token_ids, _PREFILL_ONLY,
                                                       req.priority), stream, export=True))
        done = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Exported):
                    done = True
                    return KVHandle(item.request_id, self.worker_id, item.block_ids, item.num_tokens,
                                    self.endpoint)
                if item.finish_reason is not None:
                    done = True
                    raise RuntimeError(f"prefill of {req.request_id} ended with {item.finish_reason}"
                                       + (f": {item.error}" if item.error else ""))
        finally:
            if not done:
                self.abort(req.request_id)

    @property
    def prefill_side(self) -> PrefillSide:
        if self._prefill_side is None:
            if not self.endpoint:
                raise RuntimeError("this worker has no endpoint: serve it first (start_worker_server)")
            host = self.endpoint.rsplit(":", 1)[0].strip("[]")
            self._prefill_side = PrefillSide(self, host, self.disagg_config)
        return self._prefill_side

    @property
    def decode_side(self) -> DecodeSide:
        if self._decode_side is None:
            self._decode_side = DecodeSide(self, self.disagg_config)
        return self._decode_side

    def close_kv_link(self, link_id: str) -> None:
        """A decode worker retires a link it opened to this worker (unknown ids are ignored)."""
        if self._prefill_side is not None:
            self._prefill_side.links.close(link_id)

    async def close_kv_peers(self) -> None:
        """Close the links and channels this worker opened to prefill workers (call from its loop)."""
        if self._decode_side is not None:
            await self._decode_side.close()

    async def _import_kv(self, req: GenerateRequest) -> None:
        """Pull the prompt's blocks from its prefill worker; on any failure compute the prefill here."""
        if not self.engine.config.enable_prefix_caching:
            self.num_kv_fallbacks += 1
            return
        try:
            await self.decode_side.pull(req)
        except Exception as e:  # a transfer failure is never the request's: fall back to a local prefill
            self.num_kv_fallbacks += 1
            log.warning("KV pull for %s from %s failed, prefilling here: %s", req.request_id,
                        req.kv_source.endpoint, e)

    def _require_prefix_caching(self, what: str) -> None:
        if not self.engine.config.enable_prefix_caching:
            raise ValueError(f"{what} needs enable_prefix_caching=True on this worker")

    # -- reports --------------------------------------------------------------------------------
    def oldest_wait_s(self) -> float:
        """Seconds the request longest in the scheduler's queue has waited (0: none waits). Read from
        the event loop while the engine thread runs: a copy of the list, never the live one iterated."""
        waiting = list(self.engine.scheduler.waiting)
        if not waiting:
            return 0.0
        return max(0.0, time.monotonic() - min(r.arrival_time for r in waiting))

    def load(self) -> WorkerLoad:
        sched = self.engine.scheduler
        kv = self.engine.kv_cache
        decode = self._decode_side
        return WorkerLoad(
            num_running=len(sched.running), num_waiting=len(sched.waiting) + self._thread.num_queued,
            kv_usage=kv.usage(), num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.pool.num_blocks,
            num_prefix_queries=sched.stats.num_prefix_queries, num_prefix_hits=sched.stats.num_prefix_hits,
            num_cached_blocks=kv.pool.num_cached_blocks, num_pinned_blocks=self._thread.num_pinned_blocks,
            num_importing_blocks=decode.num_importing_blocks if decode is not None else 0,
            num_kv_fallbacks=self.num_kv_fallbacks, num_expired_pins=self._thread.num_expired_pins)

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, model=self.engine.config.model,
                          block_size=self.engine.config.block_size, max_model_len=self.engine.max_request_len,
                          role=self.role)
