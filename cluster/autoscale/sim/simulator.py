"""A discrete-event simulation of one deployment under a trace, driven by real policy objects.

Arrivals go through the router's real placement code (``router/placement``: ``choose(request,
workers)`` over :class:`WorkerView` built from the simulated workers' :class:`WorkerLoad`); with no
ready replica (or, with ``max_open_per_worker``, none below that many open requests: the router's
option of that name) the router holds the request until one is. Every ``interval_s`` each pool's
autoscaling policy gets a :class:`PoolObservation` (the figures the live controller gathers) and
its decision is applied: new replicas serve after the cold start; removed ones drain (no new
requests, in-flight ones finish) and then go. A ``prefill`` + ``decode`` pair is disaggregated: a
prompt is computed in the prefill pool, then placed in the decode pool.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

from shoal.router.placement import PlacementRequest, WorkerView, make_policy as make_placement

from ..base import Policy, PoolObservation
from ..profile import Profile
from .traces import Trace
from .worker import SimRequest, SimWorker


@dataclass(frozen=True)
class SimConfig:
    interval_s: float = 5.0  # the control loop's period
    window_s: float = 10.0  # the router's arrival-rate window
    cold_start_s: float | None = None  # None: the profile's
    placement: str = "least_load"
    seed: int = 0
    tail_s: float = 600.0  # after the trace ends, at most this long for the last requests to finish
    max_open_per_worker: int = 0  # the router holds a request while every ready replica has this many; 0: off


@dataclass(frozen=True)
class Tick:
    t: float
    arrival_rate: float  # the first pool's observed rate
    replicas: Mapping[str, int]  # asked for (ready + starting), per pool, after the decision
    ready: Mapping[str, int]


@dataclass
class SimResult:
    requests: list[SimRequest]
    ticks: list[Tick]
    replica_seconds: dict[str, float]
    scale_events: int
    events: list[str] = field(default_factory=list)  # one line per decision that changed a pool


@dataclass
class _Pool:
    role: str
    policy: Policy
    workers: list[SimWorker] = field(default_factory=list)
    held: deque = field(default_factory=deque)  # requests the router holds: no ready replica
    arrivals: deque = field(default_factory=deque)  # (time, prompt_len, output_len) within the window
    tokens_at_tick: int = 0
    last_tick: float = 0.0

    def live(self, *states: str) -> list[SimWorker]:
        return [w for w in self.workers if w.state in states]


class Simulator:
    def __init__(self, trace: Trace, profile: Profile, policies: Mapping[str, Policy],
                 initial: Mapping[str, int], config: SimConfig = SimConfig()) -> None:
        self.trace, self.profile, self.config = trace, profile, config
        self.cold_start = profile.cold_start_s if config.cold_start_s is None else config.cold_start_s
        self.pools = {role: _Pool(role, policy) for role, policy in policies.items()}
        self.entry = "prefill" if "prefill" in self.pools else next(iter(self.pools))
        self.placement = make_placement(config.placement, rng=random.Random(config.seed))
        self._events: list = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.requests: list[SimRequest] = []
        self.ticks: list[Tick] = []
        self.log: list[str] = []
        self.scale_events = 0
        self.finished = 0
        for role, n in initial.items():
            for _ in range(n):
                self._add_worker(self.pools[role], 0.0, ready_at=0.0)

    # -- event plumbing -----------------------------------------------------------------------------

    def _push(self, t: float, kind: str, obj=None) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, obj))

    def run(self) -> SimResult:
        pending = deque(self.trace.requests)
        self._push(self.config.interval_s, "tick")
        end = self.trace.duration_s + self.config.tail_s
        while self._events or pending:
            if pending and (not self._events or pending[0].arrival <= self._events[0][0]):
                tr = pending.popleft()
                req = SimRequest(f"r{len(self.requests)}", tr.arrival, tr.prompt_ids, tr.output_len)
                self.requests.append(req)
                self._arrive(self.pools[self.entry], req, tr.arrival)
                continue
            t, _, kind, obj = heapq.heappop(self._events)
            if t > end:
                break
            if kind == "step":
                self._step_done(obj, t)
            elif kind == "ready":
                self._ready(obj, t)
            elif kind == "tick":
                self._tick(t)
                if t < self.trace.duration_s or self.finished < len(self.trace.requests):
                    self._push(t + self.config.interval_s, "tick")
        return SimResult(self.requests, self.ticks, self._replica_seconds(), self.scale_events, self.log)

    # -- requests -----------------------------------------------------------------------------------

    def _arrive(self, pool: _Pool, req: SimRequest, now: float) -> None:
        pool.arrivals.append((now, req.prompt_len, req.output_len))
        self._place(pool, req, now)

    def _place(self, pool: _Pool, req: SimRequest, now: float) -> None:
        ready = self._open(pool)
        if not ready:
            req.queued_at = now
            pool.held.append(req)
            return
        views = [WorkerView(w.worker_id, w.load(), in_flight=w.open_requests) for w in ready]
        chosen = self.placement.choose(PlacementRequest(req.request_id, req.prompt_ids), views)[0]
        worker = next(w for w in ready if w.worker_id == chosen)
        worker.enqueue(req, now)
        self._kick(worker, now)

    def _open(self, pool: _Pool) -> list[SimWorker]:
        """The ready replicas that take a request now (below ``max_open_per_worker``, when set)."""
        cap = self.config.max_open_per_worker
        return [w for w in pool.live("ready") if not cap or w.open_requests < cap]

    def _release_held(self, pool: _Pool, now: float) -> None:
        while pool.held and self._open(pool):
            self._place(pool, pool.held.popleft(), now)

    def _kick(self, worker: SimWorker, now: float) -> None:
        if worker.busy:
            return
        duration = worker.start_step()
        if duration is not None:
            self._push(now + duration, "step", worker)
        elif worker.state == "draining":
            self._end(worker, now)

    def _step_done(self, worker: SimWorker, now: float) -> None:
        finished, handed = worker.finish_step(now)
        self.finished += len(finished)
        for req in handed:
            self._place(self.pools["decode"], req, now)
        if finished or handed:
            self._release_held(self.pools[worker.role], now)
        self._kick(worker, now)

    # -- replicas -----------------------------------------------------------------------------------

    def _add_worker(self, pool: _Pool, now: float, ready_at: float) -> None:
        w = SimWorker(f"{pool.role}-{next(self._ids)}", pool.role, self.profile, created=now, ready_at=ready_at)
        pool.workers.append(w)
        if ready_at <= now:
            w.state = "ready"
        else:
            self._push(ready_at, "ready", w)

    def _ready(self, worker: SimWorker, now: float) -> None:
        if worker.state != "starting":
            return  # cancelled while starting
        worker.state = "ready"
        self._release_held(self.pools[worker.role], now)

    def _end(self, worker: SimWorker, now: float) -> None:
        worker.state, worker.ended = "gone", now

    def _resize(self, pool: _Pool, desired: int, now: float) -> None:
        starting, ready = pool.live("starting"), pool.live("ready")
        current = len(starting) + len(ready)
        for _ in range(desired - current):
            self._add_worker(pool, now, ready_at=now + self.cold_start)
        remove = current - desired
        for w in reversed(starting):  # a replica not serving yet goes first
            if remove <= 0:
                break
            self._end(w, now)
            remove -= 1
        for w in sorted(ready, key=lambda w: w.open_requests)[:max(0, remove)]:
            w.state = "draining"
            self._kick(w, now)

    # -- the control loop ---------------------------------------------------------------------------

    def observe(self, pool: _Pool, now: float) -> PoolObservation:
        cfg = self.config
        while pool.arrivals and pool.arrivals[0][0] < now - cfg.window_s:
            pool.arrivals.popleft()
        n = len(pool.arrivals)
        since = now - pool.last_tick
        recent = sum(1 for a in pool.arrivals if a[0] >= pool.last_tick) / since if since > 0 else 0.0
        pool.last_tick = now
        ready = pool.live("ready")
        serving = pool.live("ready", "draining")
        tokens = sum(w.tokens_computed for w in pool.workers)
        tokens_per_s = (tokens - pool.tokens_at_tick) / cfg.interval_s
        pool.tokens_at_tick = tokens
        loads = [w.load() for w in ready]
        waits = [w.oldest_wait(now) for w in serving] + ([now - pool.held[0].queued_at] if pool.held else [])
        return PoolObservation(
            now=now, pool=pool.role, ready_replicas=len(ready), starting_replicas=len(pool.live("starting")),
            num_running=sum(l.num_running for l in loads),
            num_waiting=sum(l.num_waiting for l in loads) + len(pool.held),
            kv_usage=sum(l.kv_usage for l in loads) / len(loads) if loads else 0.0,
            tokens_per_s=tokens_per_s, arrival_rate=n / min(cfg.window_s, now) if now > 0 else 0.0,
            recent_arrival_rate=recent,
            mean_prompt_len=sum(a[1] for a in pool.arrivals) / n if n else 0.0,
            mean_output_len=sum(a[2] for a in pool.arrivals) / n if n else 0.0,
            max_queue_time_s=max(waits, default=0.0))

    def _tick(self, now: float) -> None:
        rates = {}
        for pool in self.pools.values():
            obs = self.observe(pool, now)
            rates[pool.role] = obs.arrival_rate
            decision = pool.policy.decide(obs)
            if decision.replicas != obs.replicas:
                self.scale_events += 1
                self.log.append(f"t={now:.0f}s pool={pool.role} {obs.replicas}->{decision.replicas} "
                                f"{decision.reason}")
                self._resize(pool, decision.replicas, now)
        self.ticks.append(Tick(now, rates[self.entry],
                               {r: len(p.live("starting", "ready")) for r, p in self.pools.items()},
                               {r: len(p.live("ready")) for r, p in self.pools.items()}))

    def _replica_seconds(self) -> dict[str, float]:
        end = self.trace.duration_s
        return {role: sum(max(0.0, min(end, w.ended if w.ended is not None else end) - min(end, w.created))
                          for w in pool.workers) for role, pool in self.pools.items()}
