"""The Ray controller: a deployment's replicas as placement groups + worker actors, kept alive.

Each replica is one placement group (STRICT_PACK: all its TP ranks on one node, one bundle per rank
of the pool's ``resources_per_rank``) holding one ``WorkerActor`` (rank 0) in bundle 0. etcd is the
source of membership: the actor registers itself, the controller never writes worker keys, only the
spec, and deletes the deployment's keys at :meth:`Controller.stop`.

Restarts: :meth:`Controller.check` pings every actor; one that died (``ray.kill``, a crashed process,
a lost node) gets its lease revoked (its key goes at once rather than at the TTL) and a new actor
in the same placement group, with a new worker id (``<role>-<index>-<generation>``), so a router sees
"old gone, new came" and never confuses the two. Ray's own ``max_restarts`` is off on purpose: a
restarted actor would come back with no engine, and the controller re-creates it whole instead.

Hangs: an actor that is alive but answers no health ping for ``hang_timeout_s`` (counted from the
first of an unbroken run of timed-out pings; any answer resets it) is wedged: a blocked event loop,
a call stuck in C code holding the GIL. Its lease is revoked, it is killed, and it restarts like a
dead one. Only a replica that has started (its ``start()`` returned an endpoint) is judged this way:
loading a model has its own limit, ``start_timeout_s``.

Scaling (:meth:`Controller.scale`): a pool grows by new replicas with new indices (never reused, so
no worker id ever names two actors); a group the cluster cannot place within ``place_wait_s`` stays
"placing" while ``ray.autoscaler.sdk.request_resources`` asks the autoscaler (KubeRay's) for nodes
that fit every replica of the deployment. A pool shrinks by graceful drain of its highest-index
replicas: the actor deregisters (routers stop placing on it), lets in-flight requests finish within
``drain_grace_s``, then it is killed and its group removed. A replica being restarted, or whose actor
is still loading, is never picked: it is left for a later decision.

Stopping from another process: ``shoal stop NAME`` puts ``<prefix>/<name>/control`` = ``stop``;
:meth:`Controller.run` polls that key (and its own stop event) and returns when either says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import aetcd
import ray
from ray.autoscaler.sdk import request_resources as ray_request_resources
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shoal.cluster.ray_worker import WorkerActor
from shoal.cluster.registry import _norm_prefix, _check_segment, delete_deployment, put_spec
from shoal.cluster.spec import DeploymentSpec, PoolSpec

log = logging.getLogger(__name__)

STOP = b"stop"


def control_key(deployment: str, prefix: str = "/shoal") -> str:
    """``<prefix>/<deployment>/control``: ``stop`` there asks the deployment's launcher to take it down."""
    _check_segment("deployment", deployment)
    return f"{_norm_prefix(prefix)}/{deployment}/control"


def bundle_of(pool: PoolSpec, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """A replica's Ray resources: every TP rank's, in one bundle (so one node, and one actor that holds
    them all: Ray then shows rank 0 all N GPUs, and its engine starts ranks 1..N-1 on them as local
    processes). Zero entries are left out (Ray refuses an all-zero bundle)."""
    res, n = pool.resources_per_rank, pool.tensor_parallel_size
    bundle = {"CPU": res.cpu * n, "GPU": res.gpu * n, "memory": res.memory * n,
              **{k: v * n for k, v in {**res.custom, **dict(extra or {})}.items()}}
    bundle = {k: v for k, v in bundle.items() if v}
    if not bundle:
        raise ValueError("resources_per_rank must reserve something (CPU, GPU or memory > 0): "
                         "a replica with an empty bundle could be packed anywhere")
    return bundle


def _running(task: asyncio.Task | None) -> bool:
    return task is not None and not task.done()


@dataclass
class Replica:
    """One replica of a pool: its placement group lives as long as the deployment, its actor may not."""

    role: str
    index: int
    pg: PlacementGroup
    actor: Any = None  # ray ActorHandle of WorkerActor
    generation: int = 0  # actors created so far, less one
    endpoint: str | None = None
    lease_id: int | None = None
    restarts: int = 0
    hangs: int = 0  # restarts because it stopped answering, not because it died
    # When the first of the current run of unanswered health pings was sent; None: the last one answered.
    unanswered_since: float | None = None
    restarting: asyncio.Task | None = field(default=None, repr=False)
    starting: asyncio.Task | None = field(default=None, repr=False)  # a scale-up's placement + start
    draining: bool = False  # picked by a scale-down: it no longer counts, and is not restarted

    @property
    def state(self) -> str:
        """``draining``, ``placing`` (its group waits for room), ``starting`` (actor loading or being
        restarted) or ``serving``."""
        if self.draining:
            return "draining"
        if self.actor is None and _running(self.starting):
            return "placing"
        return "serving" if self.endpoint is not None else "starting"

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.index}-{self.generation}"


class Controller:
    """Create, watch and remove one deployment's replicas on the Ray cluster this process is connected to.

    ``client`` is a connected aetcd client; ``etcd_endpoints`` is what the actors connect to (it must
    be reachable from every node: not 127.0.0.1 unless the cluster is one machine).
    ``extra_resources_per_rank`` adds custom Ray resources to every bundle (e.g. a node-type resource).
    ``hang_timeout_s``: how long a started replica may leave every health ping unanswered before it
    is killed and restarted (see the module docstring). ``place_wait_s``: how long a scale-up waits for
    its placement group before asking the autoscaler for nodes through ``request_resources`` (a
    callable taking the bundle list; Ray's ``ray.autoscaler.sdk.request_resources`` by default).
    """

    def __init__(self, spec: DeploymentSpec, client: aetcd.Client, *, etcd_endpoints: str,
                 lease_ttl_s: int = 10, extra_resources_per_rank: Mapping[str, float] | None = None,
                 start_timeout_s: float = 600.0, drain_grace_s: float = 5.0, hang_timeout_s: float = 60.0,
                 place_wait_s: float = 5.0,
                 request_resources: Callable[[list[dict[str, float]]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        if not hang_timeout_s > 0:
            raise ValueError(f"hang_timeout_s must be > 0 (seconds a started replica may leave every "
                             f"health ping unanswered), got {hang_timeout_s}")
        if not place_wait_s >= 0:
            raise ValueError(f"place_wait_s must be >= 0, got {place_wait_s}")
        self.spec = spec
        self.client = client
        self.etcd_endpoints = etcd_endpoints
        self.lease_ttl_s = lease_ttl_s
        self.extra = dict(extra_resources_per_rank or {})
        self.start_timeout_s = start_timeout_s
        self.drain_grace_s = drain_grace_s
        self.hang_timeout_s = hang_timeout_s
        self.place_wait_s = place_wait_s
        self._request_resources = request_resources or (lambda bundles: ray_request_resources(bundles=bundles))
        self._asked_for_nodes = False  # a request_resources is standing: lower it when the pool shrinks
        self._clock = clock
        self.replicas: list[Replica] = []
        self._next_index = {role: pool.replicas for role, pool in spec.pools.items()}
        self._retiring: set[asyncio.Task] = set()
        self.control_key = control_key(spec.name, spec.etcd.prefix)
        for role, pool in spec.pools.items():  # refuse a bad bundle before reserving anything
            bundle_of(pool, self.extra)

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Put the spec, reserve every replica's placement group, start all actors; raise (after
        removing what was made) if a group cannot be placed or an engine fails to start in time."""
        await put_spec(self.client, self.spec)
        try:
            for role, pool in self.spec.pools.items():
                for index in range(pool.replicas):
                    self.replicas.append(await self._reserve(role, index, pool))
            await asyncio.gather(*(self._start_actor(r) for r in self.replicas))
        except BaseException:
            await self.stop()
            raise

    async def _reserve(self, role: str, index: int, pool: PoolSpec) -> Replica:
        bundles = [bundle_of(pool, self.extra)]
        pg = placement_group(bundles, strategy="STRICT_PACK", name=f"shoal-{self.spec.name}-{role}-{index}")
        replica = Replica(role, index, pg)
        try:
            await asyncio.wait_for(pg.ready(), self.start_timeout_s)
        except asyncio.TimeoutError:
            remove_placement_group(pg)
            raise RuntimeError(
                f"replica {role}-{index} of {self.spec.name!r} could not be placed within "
                f"{self.start_timeout_s:.0f} s: it needs {bundles[0]} on one "
                f"node; cluster has {ray.available_resources()} available") from None
        return replica

    async def _start_actor(self, replica: Replica) -> None:
        pool = self.spec.pools[replica.role]
        bundle = bundle_of(pool, self.extra)  # the actor takes its whole replica's bundle
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
        actor_cls = ray.remote(WorkerActor).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), memory=bundle.get("memory") or None,
            resources=custom or None, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(replica.pg, placement_group_bundle_index=0))
        replica.actor = actor_cls.remote(
            self.spec.name, replica.role, replica.worker_id, self.spec.model, dict(pool.engine),
            self.etcd_endpoints, tensor_parallel_size=pool.tensor_parallel_size, prefix=self.spec.etcd.prefix,
            lease_ttl_s=self.lease_ttl_s, meta={"replica": f"{replica.role}-{replica.index}"},
            kv_transfer=dict(pool.kv_transfer))
        replica.endpoint = await asyncio.wait_for(replica.actor.start.remote(), self.start_timeout_s)
        replica.lease_id = await replica.actor.lease_id.remote()
        log.info("%s: %s serving on %s", self.spec.name, replica.worker_id, replica.endpoint)

    # -- scale ----------------------------------------------------------------------------------

    def pool(self, role: str) -> list[Replica]:
        """The pool's replicas that count (not draining), lowest index first."""
        return sorted((r for r in self.replicas if r.role == role and not r.draining), key=lambda r: r.index)

    def counts(self, role: str) -> tuple[int, int]:
        """``(serving, starting)`` replicas of the pool; a restarting one is starting again."""
        members = self.pool(role)
        serving = sum(r.state == "serving" for r in members)
        return serving, len(members) - serving

    async def loads(self, role: str, timeout_s: float = 5.0) -> dict[str, tuple]:
        """``worker id -> (WorkerLoad, WorkerTotals)`` of the pool's serving replicas; one that does not
        answer within ``timeout_s`` is left out (the health pass judges it)."""
        serving = [r for r in self.pool(role) if r.state == "serving"]

        async def one(r: Replica):
            try:
                return r.worker_id, await asyncio.wait_for(r.actor.load.remote(), timeout_s)
            except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                log.info("%s: no load from %s: %s", self.spec.name, r.worker_id, type(e).__name__)
                return r.worker_id, None

        return {wid: load for wid, load in await asyncio.gather(*(one(r) for r in serving)) if load is not None}

    def scale(self, role: str, n: int) -> int:
        """Begin moving pool ``role`` to ``n`` replicas; -> the count it is moving to. Returns at once:
        new replicas place and start in the background, the highest-index ones drain. One of those
        that is busy restarting or loading stays (no lower, serving replica goes in its place), so
        the count returned is then above ``n``: a later call takes it."""
        if role not in self.spec.pools:
            raise ValueError(f"{self.spec.name!r} has no pool {role!r}; pools are {sorted(self.spec.pools)}")
        if n < 0:
            raise ValueError(f"a pool's replica count must be >= 0, got {n}")
        members = self.pool(role)
        if n > len(members):
            for _ in range(n - len(members)):
                self._grow(role)
        elif n < len(members):
            for r in members[n:]:
                if not self._busy(r):
                    self._retire(r)
        return len(self.pool(role))

    @staticmethod
    def _busy(replica: Replica) -> bool:
        """Half way through something that a drain must not cut: a restart, or an actor still loading."""
        return _running(replica.restarting) or (replica.actor is not None and _running(replica.starting))

    def _grow(self, role: str) -> None:
        index, self._next_index[role] = self._next_index[role], self._next_index[role] + 1
        pg = placement_group([bundle_of(self.spec.pools[role], self.extra)], strategy="STRICT_PACK",
                             name=f"shoal-{self.spec.name}-{role}-{index}")
        replica = Replica(role, index, pg)
        self.replicas.append(replica)
        replica.starting = asyncio.get_running_loop().create_task(self._bring_up(replica))
        log.info("%s: scaling %s up: replica %s-%d placing", self.spec.name, role, role, index)

    async def _bring_up(self, replica: Replica) -> None:
        try:
            await asyncio.wait_for(replica.pg.ready(), self.place_wait_s)
        except asyncio.TimeoutError:
            log.warning("%s: replica %s-%d cannot be placed yet (needs %s on one node; %s available); "
                        "asking the autoscaler for room", self.spec.name, replica.role, replica.index,
                        bundle_of(self.spec.pools[replica.role], self.extra), ray.available_resources())
            self._ask_for_nodes()
            await replica.pg.ready()
        await self._start_or_kill(replica, "starting")

    def _ask_for_nodes(self) -> None:
        """Ask for room for every counted replica of the deployment (the request replaces the last one)."""
        bundles = [bundle_of(self.spec.pools[r.role], self.extra) for r in self.replicas if not r.draining]
        try:
            self._request_resources(bundles)
            self._asked_for_nodes = True
        except Exception as e:  # noqa: BLE001 - no autoscaler to ask: the group waits for a node anyway
            log.warning("%s: request_resources failed: %s: %s", self.spec.name, type(e).__name__, e)

    def _retire(self, replica: Replica) -> None:
        replica.draining = True
        if replica.starting is not None:  # still placing (a busy one is never retired): stop it here,
            replica.starting.cancel()  # before its group's ready() can resume it into starting an actor
        log.info("%s: scaling %s down: draining %s (%s)", self.spec.name, replica.role, replica.worker_id,
                 replica.endpoint or "not serving yet")
        task = asyncio.get_running_loop().create_task(self._drain_and_remove(replica))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_and_remove(self, replica: Replica) -> None:
        if replica.starting is not None:
            await asyncio.gather(replica.starting, return_exceptions=True)
        await self._drain(replica)
        remove_placement_group(replica.pg)
        self.replicas.remove(replica)
        log.info("%s: %s removed", self.spec.name, replica.worker_id)
        if self._asked_for_nodes:  # let the autoscaler give back what the pool no longer needs
            self._ask_for_nodes()

    async def _drain(self, r: Replica) -> None:
        """Deregister, finish in-flight requests, kill. A dead or stuck actor: its lease is revoked
        (its key goes now, not at the TTL) and killing it is the drain."""
        if r.actor is None:
            return
        try:
            await asyncio.wait_for(r.actor.drain.remote(self.drain_grace_s), self.drain_grace_s + 15)
        except Exception as e:  # noqa: BLE001 - dead or stuck
            log.info("draining %s: %s: %s", r.worker_id, type(e).__name__, e)
            if r.lease_id is not None:
                try:
                    await self.client.revoke_lease(r.lease_id)
                except Exception as e2:  # noqa: BLE001 - expired already, or etcd away: the TTL finishes it
                    log.info("revoking the lease of %s: %s", r.worker_id, e2)
        ray.kill(r.actor, no_restart=True)
        r.actor = None

    # -- monitor --------------------------------------------------------------------------------

    async def check(self, ping_timeout_s: float | None = None) -> list[str]:
        """One pass: ping every actor; begin restarting those that died or hung. -> their worker ids.

        ``ping_timeout_s`` (default: 5 s, or ``hang_timeout_s`` if that is shorter) bounds one ping.
        """
        timeout = min(5.0, self.hang_timeout_s) if ping_timeout_s is None else ping_timeout_s
        judged = []

        def idle(replica: Replica) -> bool:
            return not (replica.actor is None or replica.draining or _running(replica.restarting)
                        or _running(replica.starting))

        async def ping(replica: Replica) -> None:
            if not idle(replica):
                return
            generation, sent = replica.generation, self._clock()
            try:
                await asyncio.wait_for(replica.actor.health.remote(), timeout)
            except ray.exceptions.RayActorError:
                if idle(replica) and replica.generation == generation:  # not judged by a concurrent check
                    judged.append(replica.worker_id)
                    self._begin_restart(replica, hung=False)
                return
            except asyncio.TimeoutError:
                if idle(replica) and replica.generation == generation and self._hung(replica, sent, timeout):
                    judged.append(replica.worker_id)
                    self._begin_restart(replica, hung=True)
                return
            replica.unanswered_since = None

        await asyncio.gather(*(ping(r) for r in self.replicas))
        return judged

    def _hung(self, replica: Replica, sent: float, timeout: float) -> bool:
        """Note one unanswered ping; True once a started replica has answered none for hang_timeout_s."""
        if replica.endpoint is None:  # still loading (start_timeout_s judges that) or being replaced
            replica.unanswered_since = None
            return False
        if replica.unanswered_since is None:
            replica.unanswered_since = sent
        silent = self._clock() - replica.unanswered_since
        log.warning("%s did not answer a health ping within %.1f s (silent for %.1f s of %.1f s allowed)",
                    replica.worker_id, timeout, silent, self.hang_timeout_s)
        return silent >= self.hang_timeout_s

    def _begin_restart(self, replica: Replica, hung: bool) -> None:
        replica.restarting = asyncio.get_running_loop().create_task(self._restart(replica, hung))

    async def _restart(self, replica: Replica, hung: bool = False) -> None:
        old, silent = replica.worker_id, replica.unanswered_since
        if replica.lease_id is not None:  # the key goes now, not at the TTL: routers stop at once
            try:
                await self.client.revoke_lease(replica.lease_id)
            except Exception as e:  # noqa: BLE001 - expired already, or etcd away: the TTL finishes it
                log.info("revoking the lease of %s: %s", old, e)
        if hung:  # alive but wedged: it would hold its placement group's resources forever
            ray.kill(replica.actor, no_restart=True)
            replica.hangs += 1
        replica.generation += 1
        replica.restarts += 1
        replica.endpoint = replica.lease_id = replica.unanswered_since = None
        if hung:
            log.warning("%s: worker %s hung (no health answer for %.1f s); killed it, starting %s",
                        self.spec.name, old, self._clock() - silent, replica.worker_id)
        else:
            log.warning("%s: worker %s died; starting %s", self.spec.name, old, replica.worker_id)
        await self._start_or_kill(replica, "restarting")

    async def _start_or_kill(self, replica: Replica, what: str) -> None:
        """Start the replica's actor; one that fails is killed, and the next check finds it dead and
        restarts it."""
        try:
            await self._start_actor(replica)
        except Exception as e:  # noqa: BLE001 - any start failure ends the same way
            log.error("%s: %s %s failed: %s", self.spec.name, what, replica.worker_id, e)
            if replica.actor is not None:
                ray.kill(replica.actor, no_restart=True)

    async def stop_requested(self) -> bool:
        got = await self.client.get(self.control_key.encode())
        return got is not None and got.value == STOP

    async def run(self, stop: asyncio.Event | None = None, interval_s: float = 1.0) -> str:
        """Check replicas every ``interval_s`` until ``stop`` is set or the control key says stop.
        -> ``"signal"`` or ``"control"``: why it returned. etcd hiccups are logged, not fatal."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                if await self.stop_requested():
                    return "control"
                await self.check()
            except Exception as e:  # noqa: BLE001 - keep watching through an etcd or Ray blip
                log.warning("%s: monitoring pass failed: %s: %s", self.spec.name, type(e).__name__, e)
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass
        return "signal"

    def describe(self) -> list[dict]:
        """Per replica: its current worker id, endpoint and state (:attr:`Replica.state`), restarts (all
        causes) and how many were hangs."""
        return [{"replica": f"{r.role}-{r.index}", "worker_id": r.worker_id, "endpoint": r.endpoint,
                 "state": r.state, "restarts": r.restarts, "hangs": r.hangs}
                for r in sorted(self.replicas, key=lambda r: (r.role, r.index))]

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain every actor (deregister, finish in-flight), kill it, remove its placement group and
        the deployment's etcd keys. Safe to call twice and after a partial start."""
        for r in self.replicas:
            for task in (r.restarting, r.starting):
                if _running(task):
                    task.cancel()
        await asyncio.gather(*(t for r in self.replicas for t in (r.restarting, r.starting) if t),
                             *self._retiring, return_exceptions=True)
        await asyncio.gather(*(self._drain(r) for r in self.replicas))
        for r in self.replicas:
            remove_placement_group(r.pg)
        self.replicas = []
        try:
            await delete_deployment(self.client, self.spec.name, self.spec.etcd.prefix)
        except Exception as e:  # noqa: BLE001 - etcd gone (an embedded one gets our SIGTERM too)
            log.warning("%s: could not delete its etcd keys (%s: %s)", self.spec.name, type(e).__name__, e)

