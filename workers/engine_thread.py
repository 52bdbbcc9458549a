"""``EngineThread``: the one thread that touches an ``LLMEngine`` — its step loop and its commands.

Invariants: the scheduler, block pool and executor are touched on this thread only (callers reach
them through ``Call``); every request added gets exactly one last item on its stream (a finished
delta, an error or abort delta, or ``Exported``), also when a step fails or the thread stops; KV
event batches carry consecutive ``seq`` numbers, and a new subscriber's snapshot is taken after the
older subscribers got every delta before it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from .aio import LoopQueue
from .device import torch_device
from .engine.block_pool import KVEvent
from .engine.outputs import EngineCoreOutput
from .engine.request import Request, RequestStatus
from .heartbeat import StepWatch
from .engine_commands import Abort, AddRequest, Call, Command, Exported, Subscribe, Unsubscribe, Wake
from .kv_exports import ExportTable
from .llm_engine import LLMEngine
from .metrics import EngineMetrics
from .protocol import KVEventBatch, TokenDelta, TokenLogprob

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, engine: LLMEngine, name: str, *, export_ttl_s: float, idle_wait_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self._export_ttl_s = export_ttl_s
        self._idle_wait = idle_wait_s
        self._clock = clock
        self._commands: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, LoopQueue] = {}  # request id -> its caller's queue
        self._exporting: dict[str, tuple[int, ...]] = {}  # export requests: id -> prompt token ids
        self._exports: ExportTable | None = None
        self._subscribers: list[LoopQueue] = []
        self._kv_seq = 0
        self._watch = StepWatch(clock)  # is this thread stuck in a step (not: has it turned lately)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.last_error: str | None = None  # the last failed step's error (any thread may read it)
        # fed on this thread only; a scrape from any thread refreshes it here, between steps
        self.metrics = EngineMetrics.of_engine(engine, clock=clock,
                                               run_on_engine_thread=lambda fn: self.submit(Call(lambda _: fn())))

    # -- any thread -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop after the current step; every open stream ends with an error delta."""
        self._stop.set()
        self.submit(Wake())
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, command: Command) -> None:
        self._commands.put(command)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def alive(self, max_step_s: float) -> bool:
        """Running, and no step (or command) of it has run for ``max_step_s``: an idle loop is alive
        however long it waits, and so is a long step within the bound (a wedged step shows here)."""
        return self._thread.is_alive() and not self._watch.stuck(max_step_s)

    @property
    def num_queued(self) -> int:
        """Commands not applied yet (an add waiting here counts as a waiting request)."""
        return self._commands.qsize()

    @property
    def num_subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def num_pinned_blocks(self) -> int:
        return self._exports.num_pinned_blocks if self._exports is not None else 0

    @property
    def num_expired_pins(self) -> int:
        return self._exports.num_expired if self._exports is not None else 0

    @property
    def exports(self) -> ExportTable:
        """Prompts pinned for a pull (use on this thread only, through ``Call``)."""
        if self._exports is None:
            from .executor.kv_transfer import KVSource

            self._exports = ExportTable(KVSource.of_engine(self.engine), self._export_ttl_s, self._clock)
        return self._exports

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        device = torch_device(self.engine.config)
        if device.type == "cuda" and device.index is not None:
            import torch

            torch.cuda.set_device(device)  # the current device is per thread
        core = self.engine.core
        while not self._stop.is_set():
            self._watch.begin()
            self._apply_commands(block=not core.has_unfinished_requests())
            if self._exports is not None and len(self._exports):
                self._exports.expire()
            if not core.has_unfinished_requests():
                continue
            try:
                started = self._clock()
                outputs = core.step()
            except Exception as e:  # a broken step ends its requests with an error, never a hang
                log.exception("engine step failed")
                self.last_error = f"{type(e).__name__}: {e}"
                self._fail_all(self.last_error)
                continue
            self.metrics.observe_step(started, outputs)  # first: a token a client saw is counted
            self._deliver(outputs)
            self._publish_kv_events()
        self._fail_all("engine shut down")
        if self._exports is not None:
            self._exports.release_all()
        for sub in self._subscribers:
            sub.put(None)

    def _apply_commands(self, block: bool) -> None:
        if block:
            self._watch.idle()  # waiting for work: nothing in progress can be stuck
        try:
            cmd = self._commands.get(timeout=self._idle_wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        finally:
            self._watch.begin()
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: Command) -> None:
        match cmd:
            case AddRequest():
                self._add(cmd)
            case Call():
                cmd.run(self.engine)
            case Abort(request_id=rid):
                self._abort(rid)
            case Subscribe(stream=stream):
                self._publish_kv_events()  # flush pending deltas to older subscribers first
                stream.put(KVEventBatch(self._kv_seq, "snapshot", self.engine.kv_cache.pool.snapshot()))
                self._subscribers.append(stream)
            case Unsubscribe(stream=stream):
                if stream in self._subscribers:
                    self._subscribers.remove(stream)
            case Wake():
                pass
            case _:  # a bug in a caller: refuse it without stopping the loop for everyone else
                log.error("not an engine command, ignored: %r", cmd)

    def _add(self, cmd: AddRequest) -> None:
        req = cmd.request
        if req.request_id in self._streams or req.request_id in self.engine.scheduler.requests:
            cmd.stream.put(TokenDelta(req.request_id, (), finish_reason="error",
                                      error=f"request_id {req.request_id!r} is already running"))
            return
        self._streams[req.request_id] = cmd.stream
        if cmd.export:
            self._exporting[req.request_id] = tuple(req.prompt_token_ids)
        self.engine.core.add_request(Request(req.request_id, req.prompt_token_ids, req.sampling,
                                             self.engine.eos_token_ids, req.priority))
        self.metrics.observe_added(req.request_id, len(req.prompt_token_ids))

    def _abort(self, request_id: str) -> None:
        self._exporting.pop(request_id, None)
        if self._exports is not None:
            self._exports.release(request_id)
        self.engine.core.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        self.metrics.observe_finished(request_id, "abort")
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(TokenDelta(request_id, (), finish_reason="abort"))

    def _deliver(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            logprobs = tuple(TokenLogprob(lp.token_id, lp.logprob, lp.rank, lp.top) for lp in out.new_logprobs)
            prompt_lps = tuple(TokenLogprob(lp.token_id, lp.logprob, lp.rank, lp.top)
                               for lp in out.prompt_logprobs or ())
            stop = out.stop_reason if isinstance(out.stop_reason, int) else None
            delta = TokenDelta(out.request_id, out.new_token_ids, logprobs, out.finish_reason, stop,
                               out.num_cached_tokens, prompt_logprobs=prompt_lps)
            if out.finish_reason is not None:
                del self._streams[out.request_id]
                if out.request_id in self._exporting:
                    delta = self._export(out.request_id, delta)
            stream.put(delta)

    def _export(self, request_id: str, delta: TokenDelta) -> Exported | TokenDelta:
        """A prefill request just finished (its blocks are in the prefix cache): pin them, now, before
        another step can evict them; -> what was pinned, or an error delta."""
        prompt = self._exporting.pop(request_id)
        if delta.finish_reason not in ("length", "stop"):
            return delta
        try:
            exported = self.exports.pin(request_id, prompt)
        except Exception as e:
            return TokenDelta(request_id, (), finish_reason="error", error=f"cannot pin the prompt's KV: {e}")
        return Exported(request_id, exported.block_ids, len(exported.blocks) * self.engine.config.block_size)

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
            self.metrics.observe_finished(rid, "error")
            self._streams.pop(rid).put(TokenDelta(rid, (), finish_reason="error", error=error))
