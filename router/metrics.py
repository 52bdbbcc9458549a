"""Prometheus metrics of one router, on its own ``CollectorRegistry`` (no global state: several apps
can live in one process, as they do in tests).

Prefix caching is measured twice, so the placement policy can be judged: *predicted* is what the
policy expected the chosen worker to have cached at placement (``predicted_cached_tokens``), *reported*
is what the worker then said it found (``num_cached_tokens`` of the request's deltas). Both are token
counters over the same prompts; their ratio to ``prompt_tokens`` is the hit rate. The workers' own
lifetime counters (``WorkerLoad.num_prefix_hits / num_prefix_queries``, all routers' traffic) are
exported per worker beside them.

Disaggregated serving: ``disagg_requests_total{outcome}`` counts each prompt once by the path it took
(the outcome names are ``shoal.router.disagg.OUTCOMES``), ``prefill_duration_seconds{outcome}`` times
the Prefill calls ("ok" or "failed"), and ``worker_prefill_tokens`` shows per prefill worker the prompt
tokens this router has queued there.

Workers' own series: ``/metrics`` also carries every worker's engine series (vLLM's names, from its
``GetMetrics``), each sample labelled ``worker="<id>"`` and each family's HELP/TYPE written once, so
one scrape target covers a ``shoal serve`` machine. The workers are asked concurrently under
``worker_scrape_timeout_s``; one that does not answer (or answers garbage) is left out of that scrape
and counted in ``worker_metrics_failures``, never failing the router's own series.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from .worker_pool import WorkerHandle, WorkerPool, WorkerState

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "shoal_router", *,
                 worker_scrape_timeout_s: float = 2.0) -> None:
        if not worker_scrape_timeout_s > 0:
            raise ValueError(f"worker_scrape_timeout_s must be > 0, got {worker_scrape_timeout_s}")
        self.worker_scrape_timeout_s = worker_scrape_timeout_s
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Arrival to the first generated token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram(f"{p}_inter_token_seconds", "Gap between a choice's successive deltas",
                                     ["endpoint"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{p}_request_duration_seconds", "Arrival to the last token",
                             ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{p}_queue_depth", "Requests waiting for a concurrency slot", registry=r)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests holding a concurrency slot", registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens placed on workers", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.predicted_cached = Counter(f"{p}_prefix_predicted_cached_tokens",
                                        "Prompt tokens the policy predicted cached on the chosen worker",
                                        registry=r)
        self.reported_cached = Counter(f"{p}_prefix_reported_cached_tokens",
                                       "Prompt tokens the workers reported found in their prefix cache",
                                       registry=r)
        self.prefix_hit_rate = Gauge(f"{p}_prefix_hit_rate",
                                     "Cached / prompt tokens of this router's requests", ["source"],
                                     registry=r)
        self.placements = Counter(f"{p}_worker_placements", "Prompts placed, by worker", ["worker"],
                                  registry=r)
        self.retries = Counter(f"{p}_worker_retries", "Requests moved to another worker before their "
                               "first token, by the worker that failed", ["worker"], registry=r)
        self.worker_healthy = Gauge(f"{p}_worker_healthy", "1 when the worker is in placement", ["worker"],
                                    registry=r)
        self.worker_running = Gauge(f"{p}_worker_running_requests", "Worker-reported running requests",
                                    ["worker"], registry=r)
        self.worker_waiting = Gauge(f"{p}_worker_waiting_requests", "Worker-reported waiting requests",
                                    ["worker"], registry=r)
        self.worker_kv_usage = Gauge(f"{p}_worker_kv_usage", "Fraction of the worker's KV blocks in use",
                                     ["worker"], registry=r)
        self.worker_in_flight = Gauge(f"{p}_worker_in_flight", "This router's open requests on the worker",
                                      ["worker"], registry=r)
        self.worker_prefix_hit_rate = Gauge(f"{p}_worker_prefix_hit_rate",
                                            "Worker-reported prefix cache hits / queried prompt tokens",
                                            ["worker"], registry=r)
        self.disagg_requests = Counter(f"{p}_disagg_requests", "Prompts by their prefill path (through a "
                                       "prefill worker or straight to decode, and why)", ["outcome"],
                                       registry=r)
        self.prefill_duration = Histogram(f"{p}_prefill_duration_seconds",
                                          "Prefill calls on prefill workers, by outcome (ok | failed)",
                                          ["outcome"], buckets=_LATENCY_BUCKETS, registry=r)
        self.worker_prefill_tokens = Gauge(f"{p}_worker_prefill_tokens",
                                           "Prompt tokens in this router's open Prefill calls on the worker",
                                           ["worker"], registry=r)
        # Block accounting per worker: at rest free == total; a gap that stays is a leak.
        self.worker_blocks = Gauge(f"{p}_worker_kv_blocks", "Worker-reported KV blocks by state: total, free "
                                   "(incl. evictable cached), cached (hold a prefix hash), pinned (prefilled, "
                                   "awaiting a pull), importing (reserved for KV arriving)", ["worker", "state"],
                                   registry=r)
        self.worker_kv_transfer_failures = Gauge(
            f"{p}_worker_kv_transfer_failures", "Worker-reported totals since its start: kind=fallback (a pull "
            "failed, the decode worker prefilled itself), kind=expired_pin (a prefilled prompt nobody pulled)",
            ["worker", "kind"], registry=r)
        self.worker_metrics_failures = Counter(
            f"{p}_worker_metrics_failures", "Scrapes in which the worker's own series were missing (no answer "
            "within the timeout, an error, or unparsable text)", ["worker"], registry=r)
        # The deployment's autoscaler, as its etcd records say (fed by whoever follows etcd: EtcdRouter).
        self.autoscale_desired = Gauge("shoal_autoscale_desired_replicas", "The autoscaling policy's latest "
                                       "desired replicas, by pool", ["pool"], registry=r)
        self.autoscale_current = Gauge("shoal_autoscale_current_replicas", "Replicas (serving + starting) of "
                                       "the pool when the autoscaler last decided", ["pool"], registry=r)
        self._predicted = self._reported = self._prompt = 0
        self._known_workers: set[str] = set()

    # -- per request ----------------------------------------------------------------------------

    def observe_placement(self, worker_id: str, prompt_tokens: int, predicted_cached: int | None) -> None:
        self.placements.labels(worker_id).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self._prompt += prompt_tokens
        if predicted_cached is not None:
            self.predicted_cached.inc(predicted_cached)
            self._predicted += predicted_cached
        self._update_hit_rates()

    def observe_reported_cached(self, tokens: int) -> None:
        self.reported_cached.inc(tokens)
        self._reported += tokens
        self._update_hit_rates()

    def _update_hit_rates(self) -> None:
        if self._prompt:
            self.prefix_hit_rate.labels("predicted").set(self._predicted / self._prompt)
            self.prefix_hit_rate.labels("reported").set(self._reported / self._prompt)

    def observe_autoscale(self, pools: Mapping[str, tuple[int, int]]) -> None:
        """Each autoscaled pool's latest ``(desired, current)``; a pool no longer listed is dropped."""
        self.autoscale_desired.clear()
        self.autoscale_current.clear()
        for pool, (desired, current) in pools.items():
            self.autoscale_desired.labels(pool).set(desired)
            self.autoscale_current.labels(pool).set(current)

    # -- scrape ---------------------------------------------------------------------------------

    def observe_pool(self, pool: "WorkerPool") -> None:
        """Copy the pool's latest per-worker state into gauges (called at scrape time)."""
        seen = set()
        for s in pool.states():
            w = s.worker_id
            seen.add(w)
            self.worker_healthy.labels(w).set(1 if s.healthy else 0)
            self.worker_running.labels(w).set(s.load.num_running)
            self.worker_waiting.labels(w).set(s.load.num_waiting)
            self.worker_kv_usage.labels(w).set(s.load.kv_usage)
            self.worker_in_flight.labels(w).set(s.in_flight)
            if s.role == "prefill":
                self.worker_prefill_tokens.labels(w).set(s.prefill_tokens)
            if s.load.num_prefix_queries:
                self.worker_prefix_hit_rate.labels(w).set(s.load.num_prefix_hits / s.load.num_prefix_queries)
            for state, n in (("total", s.load.num_total_blocks), ("free", s.load.num_free_blocks),
                             ("cached", s.load.num_cached_blocks), ("pinned", s.load.num_pinned_blocks),
                             ("importing", s.load.num_importing_blocks)):
                self.worker_blocks.labels(w, state).set(n)
            self.worker_kv_transfer_failures.labels(w, "fallback").set(s.load.num_kv_fallbacks)
            self.worker_kv_transfer_failures.labels(w, "expired_pin").set(s.load.num_expired_pins)
        for gone in self._known_workers - seen:  # a removed worker's series disappear
            for g in (self.worker_healthy, self.worker_running, self.worker_waiting, self.worker_kv_usage,
                      self.worker_in_flight, self.worker_prefix_hit_rate, self.worker_prefill_tokens):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
            for gauge, labels in ([(self.worker_blocks, s) for s in ("total", "free", "cached", "pinned", "importing")]
                                  + [(self.worker_kv_transfer_failures, k) for k in ("fallback", "expired_pin")]):
                try:
                    gauge.remove(gone, labels)
                except KeyError:
                    pass
        self._known_workers = seen

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_workers(self, states: Iterable["WorkerState"]) -> bytes:
        """The workers' own series, fetched concurrently, relabelled and merged (see the module doc).
        Call before :meth:`render`, so this scrape's failures are counted in it."""
        states = list(states)
        parsed = await asyncio.gather(*(self._fetch(s.worker_id, s.handle) for s in states))
        families = {}
        for state, fams in zip(states, parsed):
            if fams is None:
                self.worker_metrics_failures.labels(state.worker_id).inc()
            else:
                families[state.worker_id] = fams
        return merge_worker_series(families)

    async def _fetch(self, worker_id: str, handle: "WorkerHandle") -> list[Metric] | None:
        try:
            async with asyncio.timeout(self.worker_scrape_timeout_s):
                text = await handle.get_metrics()
            return list(text_string_to_metric_families(text))
        except Exception as e:  # noqa: BLE001  (a worker's failure must not fail the router's scrape)
            log.warning("no metrics from worker %s: %s", worker_id, f"{type(e).__name__}: {e}")
            return None


class _Families:
    """A collector of fixed, already-built families (to render them with prometheus_client)."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def describe(self):
        return []

    def collect(self):
        return self._families


def merge_worker_series(per_worker: Mapping[str, list[Metric]]) -> bytes:
    """Workers' parsed families -> one exposition: every sample gains ``worker="<id>"``, each family
    (by name) appears once with the first worker's HELP/TYPE; a worker whose family has another type
    than the first's is left out of that family (the output must stay valid)."""
    merged: dict[str, Metric] = {}
    for worker_id, families in per_worker.items():
        for fam in families:
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif out.type != fam.type:
                continue
            out.samples.extend(s._replace(labels={**s.labels, "worker": worker_id}) for s in fam.samples)
    if not merged:
        return b""
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
