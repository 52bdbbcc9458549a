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
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from .aio import settle
from .engine.block_pool import KVEvent
from .engine.outputs import EngineCoreOutput
from .engine.request import Request, RequestStatus
from .llm_engine import LLMEngine
from .protocol import GenerateRequest, KVEventBatch, KVHandle, TokenDelta, TokenLogprob, WorkerInfo, WorkerLoad
from .engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from .disagg import DecodeSide, DisaggConfig, ExportTable, PrefillSide

_PREFILL_ONLY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

log = logging.getLogger(__name__)


class _Call:
    """A function for the engine thread and the future its caller awaits. Either the caller abandons it
    first (then the engine thread runs ``undo`` on the result itself) or the engine thread finishes
    first (then the abandoning caller queues ``undo``): never both, never neither."""

    def __init__(self, fn, undo, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.fn, self.undo, self.loop, self.future = fn, undo, loop, future
        self._lock = threading.Lock()
        self._done = self._abandoned = False
        self.result, self.error = None, None

    def run(self, engine) -> None:
        try:
            result, error = self.fn(engine), None
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            result, error = None, e
        with self._lock:
            self._done, self.result, self.error = True, result, error
            abandoned = self._abandoned
        if self.future is None:  # call_soon: nobody waits
            if error is not None:
                log.error("engine-thread call failed: %r", error)
        elif not abandoned:
            self.loop.call_soon_threadsafe(settle, self.future, result, error)
        elif error is None and self.undo is not None:
            self.undo(result)

    def abandon(self) -> bool:
        """The caller leaves. True if the engine thread already produced a result the caller must undo."""
        with self._lock:
            self._abandoned = True
            return self._done and self.error is None


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
                 idle_wait_s: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 disagg: "DisaggConfig | None" = None):
        from .disagg import DisaggConfig

        self.engine = engine
        self.disagg_config = disagg or DisaggConfig()
        self.endpoint = ""  # host:port peers reach this worker's gRPC server at (set by the server)
        # prefill requests to pin when they finish: request id -> prompt token ids (engine thread)
        self._exporting: dict[str, tuple[int, ...]] = {}
        self._exports: "ExportTable | None" = None
        self._prefill_side: "PrefillSide | None" = None
        self._decode_side: "DecodeSide | None" = None
        self._kv_sink = None
        self.num_kv_fallbacks = 0  # kv_source requests whose pull failed: the prefill ran here
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
        if self._prefill_side is not None:
            self._prefill_side.close()
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
        if req.kv_source is not None:
            await self._import_kv(req)
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

    # -- disaggregated serving ------------------------------------------------------------------
    async def prefill(self, req: GenerateRequest) -> KVHandle:
        """Compute the prompt's KV blocks and pin its full ones for a pull (``DisaggConfig.export_ttl_s``).

        The request runs with one greedy token that is dropped (the decode worker samples the first
        real token, so seeded and greedy outputs equal a unified worker's). Cancelling aborts it.
        """
        self.engine.validate(req.prompt_token_ids, req.sampling)
        self._require_prefix_caching("prefill for another worker")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", (GenerateRequest(req.request_id, req.prompt_token_ids, _PREFILL_ONLY,
                                                    req.priority), stream, True)))
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, KVHandle):
                    done = True
                    return item
                if item.finish_reason is not None:
                    done = True
                    raise RuntimeError(f"prefill of {req.request_id} ended with {item.finish_reason}"
                                       + (f": {item.error}" if item.error else ""))
        finally:
            if not done:
                self.abort(req.request_id)

    async def call(self, fn: Callable[[LLMEngine], Any], undo: Callable[[Any], None] | None = None) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (block pool and executor are its alone).

        ``undo(result)`` runs on the engine thread instead of handing the result over if the caller is
        cancelled first (a reservation nobody will use must be given back, not leaked).
        """
        loop = asyncio.get_running_loop()
        pending = _Call(fn, undo, loop, loop.create_future())
        self._commands.put(("call", pending))
        try:
            while not pending.future.done():  # a loop that died never answers: do not wait forever
                await asyncio.wait({pending.future}, timeout=1.0)
                if not pending.future.done() and not self._thread.is_alive():
                    raise RuntimeError("the engine loop is not running")
        except BaseException:
            if pending.abandon() and undo is not None:  # the engine thread already ran fn
                result = pending.result
                self._commands.put(("call", _Call(lambda _: undo(result), None, loop, loop.create_future())))
            raise
        return pending.future.result()

    def call_soon(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Queue ``fn(engine)`` for the engine thread without waiting (from any thread)."""
        self._commands.put(("call", _Call(fn, None, None, None)))

    @property
    def exports(self) -> "ExportTable":
        """Prompts pinned for a pull (engine thread only)."""
        if self._exports is None:
            from .disagg import ExportTable
            from .executor.kv_transfer import KVSource

            self._exports = ExportTable(KVSource.of_engine(self.engine), self.disagg_config.export_ttl_s,
                                        self._clock)
        return self._exports

    @property
    def kv_sink(self):
        if self._kv_sink is None:
            from .executor.kv_transfer import KVSink

            self._kv_sink = KVSink.of_engine(self.engine)
        return self._kv_sink

    @property
    def kv_geometry(self):
        return self.engine.kv_block_io.geometry

    @property
    def kv_device(self):
        return self.engine.kv_block_io.device

    @property
    def prefill_side(self) -> "PrefillSide":
        if self._prefill_side is None:
            from .disagg import PrefillSide

            if not self.endpoint:
                raise RuntimeError("this worker has no endpoint: serve it first (start_worker_server)")
            host = self.endpoint.rsplit(":", 1)[0].strip("[]")
            self._prefill_side = PrefillSide(self, host, self.disagg_config)
        return self._prefill_side

    @property
    def decode_side(self) -> "DecodeSide":
        if self._decode_side is None:
            from .disagg import DecodeSide

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
            num_prefix_queries=sched.stats.num_prefix_queries, num_prefix_hits=sched.stats.num_prefix_hits,
            num_cached_blocks=kv.pool.num_cached_blocks,
            num_pinned_blocks=self._exports.num_pinned_blocks if self._exports is not None else 0,
            num_importing_blocks=self._decode_side.num_importing_blocks if self._decode_side is not None else 0,
            num_kv_fallbacks=self.num_kv_fallbacks,
            num_expired_pins=self._exports.num_expired if self._exports is not None else 0)

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, model=self.engine.config.model,
                          block_size=self.engine.config.block_size, max_model_len=self.engine.max_model_len,
                          role=self.role)

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        device = self.engine.config.torch_device
        if device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)  # the current device is per thread
        core = self.engine.core
        while not self._stop.is_set():
            self._heartbeat = self._clock()
            self._apply_commands(block=not core.has_unfinished_requests())
            if self._exports is not None and len(self._exports):
                self._exports.expire()
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
        if self._exports is not None:
            self._exports.release_all()
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
            req, stream, *export = arg
            if req.request_id in self._streams or req.request_id in self.engine.scheduler.requests:
                stream.put(TokenDelta(req.request_id, (), finish_reason="error",
                                      error=f"request_id {req.request_id!r} is already running"))
                return
            self._streams[req.request_id] = stream
            if export:
                self._exporting[req.request_id] = tuple(req.prompt_token_ids)
            self.engine.core.add_request(Request(req.request_id, req.prompt_token_ids, req.sampling,
                                                 self.engine.eos_token_ids, req.priority))
        elif kind == "call":
            arg.run(self.engine)
        elif kind == "abort":
            self._exporting.pop(arg, None)
            if self._exports is not None:
                self._exports.release(arg)
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
            delta = TokenDelta(out.request_id, out.new_token_ids, logprobs, out.finish_reason, stop,
                               out.num_cached_tokens)
            if out.finish_reason is not None:
                del self._streams[out.request_id]
                if out.request_id in self._exporting:
                    delta = self._export(out.request_id, delta)
            stream.put(delta)

    def _export(self, request_id: str, delta: TokenDelta) -> KVHandle | TokenDelta:
        """A prefill request just finished (its blocks are in the prefix cache): pin them, now, before
        another step can evict them; -> the handle, or an error delta."""
        prompt = self._exporting.pop(request_id)
        if delta.finish_reason not in ("length", "stop"):
            return delta
        try:
            exported = self.exports.pin(request_id, prompt)
        except Exception as e:
            return TokenDelta(request_id, (), finish_reason="error", error=f"cannot pin the prompt's KV: {e}")
        bs = self.engine.config.block_size
        return KVHandle(request_id, self.worker_id, exported.block_ids, len(exported.blocks) * bs, self.endpoint)

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
