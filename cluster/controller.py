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

Stopping from another process: ``shoal stop NAME`` puts ``<prefix>/<name>/control`` = ``stop``;
:meth:`Controller.run` polls that key (and its own stop event) and returns when either says so.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import aetcd
import ray
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
              **{k: v * n for k, v in dict(extra or {}).items()}}
    bundle = {k: v for k, v in bundle.items() if v}
    if not bundle:
        raise ValueError("resources_per_rank must reserve something (CPU, GPU or memory > 0): "
                         "a replica with an empty bundle could be packed anywhere")
    return bundle


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
    restarting: asyncio.Task | None = field(default=None, repr=False)

    @property
    def worker_id(self) -> str:
        return f"{self.role}-{self.index}-{self.generation}"


class Controller:
    """Create, watch and remove one deployment's replicas on the Ray cluster this process is connected to.

    ``client`` is a connected aetcd client; ``etcd_endpoints`` is what the actors connect to (it must
    be reachable from every node: not 127.0.0.1 unless the cluster is one machine).
    ``extra_resources_per_rank`` adds custom Ray resources to every bundle (e.g. a node-type resource).
    """

    def __init__(self, spec: DeploymentSpec, client: aetcd.Client, *, etcd_endpoints: str,
                 lease_ttl_s: int = 10, extra_resources_per_rank: Mapping[str, float] | None = None,
                 start_timeout_s: float = 600.0, drain_grace_s: float = 5.0) -> None:
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self.spec = spec
        self.client = client
        self.etcd_endpoints = etcd_endpoints
        self.lease_ttl_s = lease_ttl_s
        self.extra = dict(extra_resources_per_rank or {})
        self.start_timeout_s = start_timeout_s
        self.drain_grace_s = drain_grace_s
        self.replicas: list[Replica] = []
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
            lease_ttl_s=self.lease_ttl_s, meta={"replica": f"{replica.role}-{replica.index}"})
        replica.endpoint = await asyncio.wait_for(replica.actor.start.remote(), self.start_timeout_s)
        replica.lease_id = await replica.actor.lease_id.remote()
        log.info("%s: %s serving on %s", self.spec.name, replica.worker_id, replica.endpoint)

    # -- monitor --------------------------------------------------------------------------------

    async def check(self, ping_timeout_s: float = 5.0) -> list[str]:
        """One pass: ping every actor; begin restarting those that died. -> worker ids found dead."""
        dead = []

        async def ping(replica: Replica) -> None:
            if replica.restarting is not None and not replica.restarting.done():
                return
            try:
                await asyncio.wait_for(replica.actor.health.remote(), ping_timeout_s)
            except ray.exceptions.RayActorError:
                dead.append(replica.worker_id)
                replica.restarting = asyncio.get_running_loop().create_task(self._restart(replica))
            except asyncio.TimeoutError:  # busy or wedged: the engine watchdog and the lease judge that
                log.warning("%s did not answer a health ping within %.0f s", replica.worker_id, ping_timeout_s)

        await asyncio.gather(*(ping(r) for r in self.replicas))
        return dead

    async def _restart(self, replica: Replica) -> None:
        old = replica.worker_id
        if replica.lease_id is not None:  # the key goes now, not at the TTL: routers stop at once
            try:
                await self.client.revoke_lease(replica.lease_id)
            except Exception as e:  # noqa: BLE001 - expired already, or etcd away: the TTL finishes it
                log.info("revoking the lease of %s: %s", old, e)
        replica.generation += 1
        replica.restarts += 1
        replica.endpoint = replica.lease_id = None
        log.warning("%s: worker %s died; starting %s", self.spec.name, old, replica.worker_id)
        try:
            await self._start_actor(replica)
        except Exception as e:  # noqa: BLE001 - kill it; the next check finds it dead and tries again
            log.error("%s: restarting %s failed: %s", self.spec.name, replica.worker_id, e)
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
        return [{"replica": f"{r.role}-{r.index}", "worker_id": r.worker_id, "endpoint": r.endpoint,
                 "restarts": r.restarts} for r in self.replicas]

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain every actor (deregister, finish in-flight), kill it, remove its placement group and
        the deployment's etcd keys. Safe to call twice and after a partial start."""
        for r in self.replicas:
            if r.restarting is not None and not r.restarting.done():
                r.restarting.cancel()
        await asyncio.gather(*(r.restarting for r in self.replicas if r.restarting), return_exceptions=True)

        async def drain(r: Replica) -> None:
            if r.actor is None:
                return
            try:
                await asyncio.wait_for(r.actor.drain.remote(self.drain_grace_s), self.drain_grace_s + 15)
            except Exception as e:  # noqa: BLE001 - dead or stuck: killing it is the drain
                log.info("draining %s: %s: %s", r.worker_id, type(e).__name__, e)
            ray.kill(r.actor, no_restart=True)
            r.actor = None

        await asyncio.gather(*(drain(r) for r in self.replicas))
        for r in self.replicas:
            remove_placement_group(r.pg)
        self.replicas = []
        try:
            await delete_deployment(self.client, self.spec.name, self.spec.etcd.prefix)
        except Exception as e:  # noqa: BLE001 - etcd gone (an embedded one gets our SIGTERM too)
            log.warning("%s: could not delete its etcd keys (%s: %s)", self.spec.name, type(e).__name__, e)

