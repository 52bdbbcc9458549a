"""``EngineMetrics``: one engine's Prometheus series, named as vLLM names them, plus shoal's own.

The names, types, label (``model_name``) and histogram buckets are vLLM v1's
(``vllm/v1/metrics/loggers.py``), so a Grafana dashboard built for vLLM reads a shoal worker unchanged.
Each ``EngineMetrics`` has its own ``CollectorRegistry`` (never the global one: several engines live in
one test process).

Who calls what (torch-free; the engine objects are duck-typed):

- the engine thread: :meth:`observe_added` when a request enters the scheduler, :meth:`observe_step`
  after each step with its outputs, :meth:`observe_finished` when a request ends outside a step (abort,
  a failed step). Request timings live here, keyed by request id, and leave at the request's end.
- any thread: :meth:`render` (or prometheus_client's HTTP server on :attr:`registry`). Before the
  series are read, a refresh of the gauges and of the scheduler-counter deltas runs *on the engine
  thread* (through the injected ``run_on_engine_thread``), so one scrape sees one consistent moment
  of the block pool, also after changes no hook sees (a pinned export expiring, an import released).
  If the engine thread does not answer within ``refresh_timeout_s`` (a long step, a dead loop) the
  last values are served.

Timing follows vLLM: arrival = the request reached the engine thread; scheduled = the start of the
first step that ran it; TTFT = first token - arrival; inter-token latency = gap between successive
tokens (``vllm:time_per_output_token_seconds``, its older name, gets the same observations, as vLLM
exposed both while renaming it); queue = scheduled - arrival; prefill = first token - scheduled;
decode = last token - first token; inference = last token - scheduled; e2e = end - arrival.
Prompt tokens are counted when the prompt's prefill completes (the first token), as vLLM does.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .protocol import WorkerTotals

# vLLM v1's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")  # every label value exists from the start, at 0

log = logging.getLogger(__name__)


def _never_raises(hook):
    """An engine-thread hook: a bug in the metrics is logged, it never stops the engine loop."""

    @functools.wraps(hook)
    def guarded(self, *args):
        try:
            hook(self, *args)
        except Exception:  # noqa: BLE001
            log.exception("metrics hook %s failed (the engine goes on)", hook.__name__)

    return guarded


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# -- what the engine offers (duck-typed: this module imports no engine code, so no torch) --------
class _Stats(Protocol):
    num_prefix_queries: int
    num_prefix_hits: int
    num_preemptions: int


class _Scheduler(Protocol):
    running: list
    waiting: list
    requests: dict  # request id -> Request (``status.name``) while unfinished
    stats: _Stats


class _KVCache(Protocol):
    def usage(self) -> float: ...

    def block_counts(self): ...  # -> engine.block_pool.BlockCounts


class _Output(Protocol):  # engine.outputs.EngineCoreOutput
    request_id: str
    new_token_ids: tuple
    finish_reason: str | None


@dataclass(slots=True)
class _Timing:
    """One request's timestamps (engine thread only); None until the event happened."""

    arrival: float
    num_prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0


class _RefreshFirst:
    """A collector that yields nothing, registered first: collecting the registry refreshes the
    engine's gauges before any series is read, whichever exposition path reads it."""

    def __init__(self, refresh: Callable[[], None]):
        self._refresh = refresh

    def describe(self):
        return []  # registering must not run a refresh

    def collect(self):
        self._refresh()
        return []


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int, scheduler: _Scheduler, kv_cache: _KVCache, *,
                 clock: Callable[[], float] = time.monotonic,
                 run_on_engine_thread: Callable[[Callable[[], None]], None] | None = None,
                 refresh_timeout_s: float = 1.0):
        if not refresh_timeout_s > 0:
            raise ValueError(f"refresh_timeout_s must be > 0, got {refresh_timeout_s}")
        self.model_name = model_name
        self._scheduler, self._kv = scheduler, kv_cache
        self._clock = clock
        self._run_on_engine_thread = run_on_engine_thread
        self._refresh_timeout_s = refresh_timeout_s
        self._timings: dict[str, _Timing] = {}  # unfinished requests
        self._unscheduled: dict[str, _Timing] = {}  # of those, the ones no step has run yet
        self._seen = (0, 0, 0)  # scheduler stats already counted: prefix queries, prefix hits, preemptions
        self.registry = CollectorRegistry()
        self.registry.register(_RefreshFirst(self._refresh_from_any_thread))
        self._engine_thread: threading.Thread | None = None  # the thread the hooks run on, once seen
        self._build(max_model_len)
        self._copy_state()

    @classmethod
    def of_engine(cls, engine, **kw) -> "EngineMetrics":
        """For an ``LLMEngine`` (its model path names the series, as ``WorkerInfo.model`` does)."""
        return cls(engine.config.model, engine.max_model_len, engine.scheduler, engine.kv_cache, **kw)

    # -- the series ---------------------------------------------------------------------------------
    def _gauge(self, name: str, doc: str):
        return Gauge(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, doc: str):
        return Counter(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _histogram(self, name: str, doc: str, buckets):
        return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(self.model_name)

    def _build(self, max_model_len: int) -> None:
        self._build_engine_series()
        self._build_request_series(max_model_len)
        self._build_block_series()

    def _build_engine_series(self) -> None:
        gauge, counter = self._gauge, self._counter
        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        # vLLM's older and newer names of one value; dashboards use either. 0..1 on any device.
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.steps = counter("shoal:engine_steps", "Engine steps run.")

    def _build_request_series(self, max_model_len: int) -> None:
        histogram = self._histogram
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self._success.labels(self.model_name, reason)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds. DEPRECATED: Use "
                              "vllm:inter_token_latency_seconds instead.", ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)

        def phase(name, doc):
            return histogram(f"vllm:{name}", doc, REQUEST_LATENCY_BUCKETS)

        self.e2e = phase("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.")
        self.queue_time = phase("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.")
        self.inference_time = phase("request_inference_time_seconds",
                                    "Histogram of time spent in RUNNING phase for request.")
        self.prefill_time = phase("request_prefill_time_seconds",
                                  "Histogram of time spent in PREFILL phase for request.")
        self.decode_time = phase("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.")
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
    def _build_block_series(self) -> None:
        """shoal's own: the block pool's books (a chaos test proves in_use == 0 after a workload)."""
        gauge = self._gauge
        self.blocks_total = gauge("shoal:kv_blocks_total", "KV blocks in the pool.")
        self.blocks_free = gauge("shoal:kv_blocks_free",
                                 "KV blocks that can be handed out now (never cached, or cached and evictable).")
        self.blocks_cached = gauge("shoal:kv_blocks_cached", "KV blocks holding a prefix-cache hash (in use or free).")
        self.blocks_in_use = gauge("shoal:kv_blocks_in_use", "KV blocks held by running requests, pinned exports "
                                   "or imports; 0 at rest, or blocks leaked.")

    # -- engine thread --------------------------------------------------------------------------
    @_never_raises
    def observe_added(self, request_id: str, num_prompt_tokens: int) -> None:
        self._timings[request_id] = self._unscheduled[request_id] = _Timing(self._clock(), num_prompt_tokens)
        self.refresh()

    @_never_raises
    def observe_step(self, started: float, outputs: Iterable[_Output]) -> None:
        """After a step that began at ``started`` (this object's clock) and produced ``outputs``."""
        now = self._clock()
        self.steps.inc()
        requests = self._scheduler.requests
        for rid in [rid for rid in self._unscheduled
                    if (req := requests.get(rid)) is None or req.status.name != "WAITING"]:
            self._unscheduled.pop(rid).scheduled = started  # gone from requests: ran and finished in this step
        for out in outputs:
            t = self._timings.get(out.request_id)
            if t is None:
                continue
            n = len(out.new_token_ids)
            if n:
                if t.first_token is None:
                    t.first_token = now
                    self.ttft.observe(now - t.arrival)
                    self.prompt_tokens.inc(t.num_prompt_tokens)
                else:  # one observation per output after the first, as vLLM does
                    self.itl.observe(now - t.last_token)
                    self.tpot.observe(now - t.last_token)
                t.last_token = now
                t.num_generated += n
                self.generation_tokens.inc(n)
            if out.finish_reason is not None:
                self._finish(out.request_id, out.finish_reason, now)
        self.refresh()

    @_never_raises
    def observe_finished(self, request_id: str, reason: str) -> None:
        """A request ended outside a step (``abort``, ``error``); ids already finished are ignored."""
        if request_id in self._timings:
            self._finish(request_id, reason, self._clock())
        self.refresh()

    def refresh(self) -> None:
        """Copy the scheduler's and the block pool's state into the series (engine thread only)."""
        self._engine_thread = threading.current_thread()
        self._copy_state()

    def _copy_state(self) -> None:
        s = self._scheduler
        self.running.set(len(s.running))
        self.waiting.set(len(s.waiting))
        usage = self._kv.usage()
        self.gpu_cache_usage.set(usage)
        self.kv_cache_usage.set(usage)
        c = self._kv.block_counts()
        self.blocks_total.set(c.total)
        self.blocks_free.set(c.free)
        self.blocks_cached.set(c.cached)
        self.blocks_in_use.set(c.in_use)
        seen = (s.stats.num_prefix_queries, s.stats.num_prefix_hits, s.stats.num_preemptions)
        for counter, now, before in zip((self.prefix_queries, self.prefix_hits, self.preemptions), seen, self._seen):
            if now > before:  # scheduler stats only grow; counters take the difference
                counter.inc(now - before)
        self._seen = seen

    def _finish(self, request_id: str, reason: str, now: float) -> None:
        t = self._timings.pop(request_id)
        self._unscheduled.pop(request_id, None)
        # An event that never happened takes the next one's time: a request aborted while waiting
        # spent all of it queued, one aborted before its first token all of it in prefill.
        scheduled = t.scheduled if t.scheduled is not None else now
        first = t.first_token if t.first_token is not None else now
        last = t.last_token if t.last_token is not None else first
        self._success.labels(self.model_name, reason).inc()
        self.e2e.observe(now - t.arrival)
        self.queue_time.observe(scheduled - t.arrival)
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(last - first)
        self.inference_time.observe(last - scheduled)
        self.request_prompt_tokens.observe(t.num_prompt_tokens)
        self.request_generation_tokens.observe(t.num_generated)
        # vLLM: (e2e - ttft) / (tokens - 1), zero for requests of at most one token
        self.request_tpot.observe((last - first) / (t.num_generated - 1) if t.num_generated > 1 else 0.0)

    # -- any thread -----------------------------------------------------------------------------
    def totals(self) -> WorkerTotals:
        """The counters since start as one :class:`WorkerTotals`, read in one refresh."""
        values: dict[str, float] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value  # summed over labels
        return WorkerTotals(
            num_finished=int(values.get("vllm:request_success_total", 0)),
            prompt_tokens=int(values.get("vllm:request_prompt_tokens_sum", 0)),
            output_tokens=int(values.get("vllm:request_generation_tokens_sum", 0)),
            computed_tokens=int(values.get("vllm:prompt_tokens_total", 0) + values.get("vllm:generation_tokens_total", 0)))

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of this engine's series."""
        return generate_latest(self.registry)

    def _refresh_from_any_thread(self) -> None:
        engine_thread = self._engine_thread
        if engine_thread is threading.current_thread() or (engine_thread is not None
                                                           and not engine_thread.is_alive()):
            self._copy_state()  # no other writer: read here (a stopped engine answers no call)
            return
        if self._run_on_engine_thread is None:
            return
        done = threading.Event()

        def refresh() -> None:
            try:
                self.refresh()
            finally:
                done.set()

        self._run_on_engine_thread(refresh)
        done.wait(self._refresh_timeout_s)  # not answered (a long step, a wedged loop): the last values
