"""The live reconcile loop: every ``interval_s``, observe each autoscaled pool, ask its policy, apply.

Policies are pure (:mod:`.base`); this loop owns the clock. Per pool and tick:

1. the source's :class:`PoolObservation` (by default :class:`ControllerSource`: serving / starting
   replicas from the controller, queue and KV figures and counter-derived rates from the workers'
   load reports, :mod:`.observe`);
2. the pool's policy (``make_policy`` from the spec's ``autoscaling.<pool>`` block) -> a Decision;
3. a decision that changes the count goes to ``target.scale(pool, n)`` (the Ray controller: new
   replicas start, surplus ones drain) and gets one log line with its reason and inputs;
4. the decision is put in etcd (:mod:`.record`) for ``shoal status`` and the routers' ``/metrics``.

A pool without an ``autoscaling`` block is never touched. A tick that fails (etcd or Ray away) is
logged and the next one tries again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable, Mapping, Protocol

from shoal.cluster.registry import demand_prefix, held_requests
from shoal.cluster.spec import DeploymentSpec, PoolAutoscaling

from .base import Bounds, Decision, Policy, PoolObservation, make_policy
from .observe import LoadWindow
from .record import DecisionRecord, put_decision

log = logging.getLogger(__name__)

_OBSERVED = ("ready_replicas", "starting_replicas", "num_running", "num_waiting", "kv_usage", "tokens_per_s",
             "arrival_rate", "mean_prompt_len", "mean_output_len")


class ObservationSource(Protocol):
    async def observe(self, pool: str, now: float) -> PoolObservation:
        ...


class ScaleTarget(Protocol):
    def scale(self, role: str, n: int) -> int:
        ...


class ControllerSource:
    """Observations from a :class:`~shoal.cluster.controller.Controller`: its replica counts and its
    actors' ``load()`` answers, rates over ``window_s``. With an etcd ``client``, the requests routers
    hold (while no worker serves: scale to zero; while every worker is full: max_open_per_worker),
    read from their demand keys, count as waiting in every pool that serves Generate (unified,
    decode): they reach no worker's figures yet."""

    def __init__(self, controller, window_s: float = 30.0, client=None) -> None:
        self.controller = controller
        self.window_s = window_s
        self.client = client
        self.windows: dict[str, LoadWindow] = {}

    async def observe(self, pool: str, now: float) -> PoolObservation:
        window = self.windows.setdefault(pool, LoadWindow(self.window_s))
        window.add(now, await self.controller.loads(pool))
        ready, starting = self.controller.counts(pool)
        obs = window.observation(pool, now, ready, starting)
        held = await self.routers_holding() if pool != "prefill" else 0
        return dataclasses.replace(obs, num_waiting=obs.num_waiting + held) if held else obs

    async def routers_holding(self) -> int:
        if self.client is None:
            return 0
        spec = self.controller.spec
        found = await self.client.get_prefix(demand_prefix(spec.name, spec.etcd.prefix).encode())
        return sum(held_requests(kv.value) for kv in found)


def make_pool_policy(pool: str, auto: PoolAutoscaling) -> Policy:
    """The policy a spec's ``autoscaling.<pool>`` block names; a ValueError names the block."""
    try:
        return make_policy(auto.policy, Bounds(auto.min_replicas, auto.max_replicas), None, **dict(auto.options))
    except (ValueError, OSError) as e:  # an option the declaration refuses, a profile file that is not there
        raise ValueError(f"autoscaling.{pool} (policy {auto.policy!r}): {e}") from e


class Autoscaler:
    """The reconcile loop of one deployment's autoscaled pools.

    ``target`` applies a count (``Controller.scale``); ``source`` observes a pool; ``client`` (aetcd,
    optional) receives the decision records. ``clock`` gives the policies' time (monotonic seconds),
    ``wall`` the records' (Unix seconds). ``zero_after_s``: a pool is taken to zero only once the loop
    has watched it that long (a fresh loop has no arrival history: a quiet first moment is not idleness).
    """

    def __init__(self, spec: DeploymentSpec, target: ScaleTarget, source: ObservationSource, *, client=None,
                 interval_s: float = 5.0, zero_after_s: float = 30.0, policies: Mapping[str, Policy] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 (seconds between autoscaling decisions), got {interval_s}")
        self.spec, self.target, self.source, self.client = spec, target, source, client
        self.interval_s = interval_s
        self.policies = dict(policies) if policies is not None else {
            pool: make_pool_policy(pool, auto) for pool, auto in spec.autoscaling.items()}
        for pool in self.policies:
            if pool not in spec.pools:
                raise ValueError(f"autoscaling names pool {pool!r}; {spec.name!r} has {sorted(spec.pools)}")
        if not zero_after_s >= 0:
            raise ValueError(f"zero_after_s must be >= 0, got {zero_after_s}")
        self.zero_after_s = zero_after_s
        self._clock, self._wall = clock, wall
        self._watched_since: dict[str, float] = {}
        self.latest: dict[str, DecisionRecord] = {}

    async def tick(self) -> dict[str, DecisionRecord]:
        """One decision per autoscaled pool, applied and recorded; -> pool -> its record."""
        for pool, policy in self.policies.items():
            obs = await self.source.observe(pool, self._clock())
            decision = self._not_to_zero_yet(pool, obs, policy.decide(obs))
            if decision.replicas != obs.replicas:
                moving_to = self.target.scale(pool, decision.replicas)
                log.info("%s: autoscale %s %d -> %d (%s; now moving to %d): %s", self.spec.name, pool, obs.replicas,
                         decision.replicas, policy.name, moving_to, decision.reason)
                log.info("%s: autoscale %s inputs %s", self.spec.name, pool, _inputs(obs, decision))
            record = DecisionRecord(pool, decision.replicas, obs.replicas, obs.ready_replicas, policy.name,
                                    decision.reason, _inputs(obs, decision), self._wall())
            self.latest[pool] = record
            if self.client is not None:
                await put_decision(self.client, self.spec.name, record, self.spec.etcd.prefix)
        return dict(self.latest)

    def _not_to_zero_yet(self, pool: str, obs: PoolObservation, decision: Decision) -> Decision:
        since = self._watched_since.setdefault(pool, obs.now)
        if decision.replicas > 0 or obs.replicas == 0 or obs.now - since >= self.zero_after_s:
            return decision
        return Decision(1, f"{decision.reason}; not to zero before {self.zero_after_s:g} s watched", decision.inputs)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set; a failed tick is logged, not fatal."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as e:  # noqa: BLE001 - keep deciding through an etcd or Ray blip
                log.warning("%s: autoscaling pass failed: %s: %s", self.spec.name, type(e).__name__, e)
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass


def _inputs(obs: PoolObservation, decision: Decision) -> dict[str, float]:
    observed = {name: round(float(getattr(obs, name)), 4) for name in _OBSERVED}
    return {**observed, **{k: round(float(v), 4) for k, v in decision.inputs.items()}}
