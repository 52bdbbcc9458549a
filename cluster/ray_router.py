"""Router replicas 1..N-1 of a deployment as Ray actors (replica 0 runs in ``shoal launch`` itself).

Every router is the same :class:`~shoal.cluster.etcd_router.EtcdRouter`: it reads the deployment's spec
from etcd, follows the same worker membership there, and registers itself under
``<prefix>/<deployment>/routers/<router_id>`` with a lease. Routers share no state: each one's
placement view (prefix index, loads) is rebuilt from the workers' KV events and load reports, so a
load balancer may send any request to any replica.

Placement: SPREAD, and a label selector that keeps a router off the nodes where another router of
the deployment already runs (the launcher's node included). With a fixed port that is a hard rule
(two routers on one node would fight for the port; :meth:`RouterReplicas.check_nodes` refuses more
routers than nodes up front); with port 0 it is a preference (each router picks a free port, so
sharing a node is fine when nodes run out).

Restarts mirror the worker controller: :meth:`RouterReplicas.check` pings every actor; a dead one
(or one whose server or lease keep-alive stopped) has its lease revoked and is replaced by a new
actor with a new id (``router-<index>-<generation>``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aetcd
import ray

from shoal.cluster.spec import DeploymentSpec

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its node id


def router_id(index: int, generation: int = 0) -> str:
    """``router-<index>-<generation>``: replica 0 is the launcher's own router."""
    return f"router-{index}-{generation}"


class RouterActor:
    """Wrap with ``ray.remote(RouterActor)``: one :class:`EtcdRouter` on the actor's event loop.

    ``start()`` connects to etcd, reads the spec the launcher put there, serves the OpenAI API on
    ``host:port`` (port 0: a free one) and registers; it returns ``{"url", "node_id", "lease_id"}``.
    A failure in ``start()`` leaves nothing listening or registered.
    """

    def __init__(self, deployment: str, etcd_endpoints: str, router_id: str, *, prefix: str = "/shoal",
                 host: str = "0.0.0.0", port: int = 0, lease_ttl_s: int = 10,
                 health_interval_s: float = 1.0) -> None:
        self.deployment, self.etcd_endpoints, self.router_id = deployment, etcd_endpoints, router_id
        self.prefix, self.host, self.port = prefix, host, port
        self.lease_ttl_s, self.health_interval_s = lease_ttl_s, health_interval_s
        self._client = None  # aetcd.Client
        self._router = None  # EtcdRouter

    async def start(self) -> dict:
        from shoal.cluster.etcd_router import EtcdRouter
        from shoal.cluster.registry import connect, get_spec

        if self._router is not None:
            return self._started()
        node_id = ray.get_runtime_context().get_node_id()
        node_ip = ray.util.get_node_ip_address()
        self._client = await connect(self.etcd_endpoints)
        try:
            spec = await get_spec(self._client, self.deployment, self.prefix)
            if spec is None:
                raise RuntimeError(f"deployment {self.deployment!r} has no spec under {self.prefix} in etcd "
                                   f"{self.etcd_endpoints}: the launcher puts it there before starting routers")
            self._router = EtcdRouter(spec, self._client, host=self.host, port=self.port,
                                      health_interval_s=self.health_interval_s, router_id=self.router_id,
                                      lease_ttl_s=self.lease_ttl_s, advertise_host=node_ip,
                                      meta={"node_id": node_id})
            try:
                await self._router.start()
            except OSError as e:  # the port: name the node, the likely cause and the way out
                raise RuntimeError(f"{self.router_id} cannot listen on {self.host}:{self.port} on node {node_ip} "
                                   f"({e}); with a fixed router port, one router per node") from None
        except BaseException:
            await self.stop()
            raise
        log.info("router %s serving on %s", self.router_id, self._router.url)
        return self._started()

    def _started(self) -> dict:
        return {"url": self._router.url, "node_id": ray.get_runtime_context().get_node_id(),
                "lease_id": self._router.registration.lease_id}

    async def health(self) -> dict:
        """``{"serving", "router_id", "url"}``: serving means uvicorn runs and the lease is kept alive."""
        router = self._router
        return {"serving": router is not None and router.serving, "router_id": self.router_id,
                "url": router.url if router is not None else None}

    async def stop(self) -> None:
        """Deregister, stop serving (in-flight requests finish), close etcd. Idempotent."""
        router, self._router = self._router, None
        if router is not None:
            await router.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.close()


@dataclass
class RouterReplica:
    """One router actor slot; its actor is replaced (with a new generation) when it dies."""

    index: int
    actor: Any = None  # ray ActorHandle of RouterActor
    generation: int = 0
    url: str | None = None
    node_id: str | None = None
    lease_id: int | None = None
    restarts: int = 0
    restarting: asyncio.Task | None = field(default=None, repr=False)

    @property
    def router_id(self) -> str:
        return router_id(self.index, self.generation)


class RouterReplicas:
    """Routers 1..``spec.router.replicas``-1 as Ray actors: start, check (restart the dead), stop.

    ``client`` is the launcher's connected etcd client (to revoke a dead router's lease);
    ``etcd_endpoints`` is what the actors connect to; ``local_node_id`` is the node of router 0.
    """

    def __init__(self, spec: DeploymentSpec, client: aetcd.Client, *, etcd_endpoints: str,
                 local_node_id: str | None, host: str = "0.0.0.0", port: int | None = None,
                 lease_ttl_s: int = 10, start_timeout_s: float = 120.0, health_interval_s: float = 1.0) -> None:
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        self.spec, self.client, self.etcd_endpoints = spec, client, etcd_endpoints
        self.local_node_id = local_node_id
        self.host = host
        self.port = spec.router.port if port is None else port
        self.lease_ttl_s, self.start_timeout_s = lease_ttl_s, start_timeout_s
        self.health_interval_s = health_interval_s
        self.count = spec.router.replicas - 1
        self.replicas: list[RouterReplica] = []

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas if r.url]

    def check_nodes(self, alive_nodes: int | None = None) -> None:
        """With a fixed port every router needs a node of its own: refuse more routers than nodes
        (``alive_nodes``: default, the connected Ray cluster's)."""
        if self.port == 0 or self.count == 0:
            return
        alive = sum(1 for n in ray.nodes() if n.get("Alive")) if alive_nodes is None else alive_nodes
        if self.spec.router.replicas > alive:
            raise ValueError(f"router.replicas={self.spec.router.replicas} on the fixed router port {self.port} "
                             f"needs {self.spec.router.replicas} Ray nodes (one router per node and port); the "
                             f"cluster has {alive}: lower router.replicas or launch with --port 0")

    # -- start ----------------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Start the actors one after another (each placement sees where the others landed); raise on
        the first that fails (call :meth:`stop` to remove the rest). -> their URLs."""
        self.check_nodes()
        for index in range(1, self.count + 1):
            replica = RouterReplica(index)
            self.replicas.append(replica)
            await self._start_actor(replica)
        return self.urls

    def _placement(self, replica: RouterReplica) -> dict:
        taken = {self.local_node_id} | {r.node_id for r in self.replicas if r is not replica}
        taken.discard(None)
        options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
        if taken:
            options["label_selector"] = {NODE_ID_LABEL: f"!in({','.join(sorted(taken))})"}
            if self.port == 0:  # a preference only: free ports let routers share a node
                options["fallback_strategy"] = [{"label_selector": {}}]
        return options

    async def _start_actor(self, replica: RouterReplica) -> None:
        # num_cpus=0: a router must not wait for CPUs the workers' placement groups hold.
        actor_cls = ray.remote(RouterActor).options(num_cpus=0, max_restarts=0, **self._placement(replica))
        replica.actor = actor_cls.remote(
            self.spec.name, self.etcd_endpoints, replica.router_id, prefix=self.spec.etcd.prefix, host=self.host,
            port=self.port, lease_ttl_s=self.lease_ttl_s, health_interval_s=self.health_interval_s)
        try:
            started = await asyncio.wait_for(replica.actor.start.remote(), self.start_timeout_s)
        except BaseException as e:
            ray.kill(replica.actor, no_restart=True)  # pending or half-started: the next check retries
            if isinstance(e, asyncio.TimeoutError):
                where = f" (on the fixed port {self.port} it needs a node without another router)" if self.port else ""
                raise RuntimeError(f"{replica.router_id} of {self.spec.name!r} did not start within "
                                   f"{self.start_timeout_s:.0f} s{where}") from None
            raise
        replica.url, replica.node_id, replica.lease_id = started["url"], started["node_id"], started["lease_id"]
        log.info("%s: %s serving on %s", self.spec.name, replica.router_id, replica.url)

    # -- monitor --------------------------------------------------------------------------------

    async def check(self, ping_timeout_s: float = 5.0) -> list[str]:
        """One pass: ping every actor; begin replacing those that died or stopped serving.
        -> router ids found dead."""
        dead = []

        async def ping(replica: RouterReplica) -> None:
            if replica.restarting is not None and not replica.restarting.done():
                return
            try:
                health = await asyncio.wait_for(replica.actor.health.remote(), ping_timeout_s)
            except ray.exceptions.RayActorError:
                health = None
            except asyncio.TimeoutError:  # a busy event loop is not a dead router
                log.warning("%s did not answer a health ping within %.0f s", replica.router_id, ping_timeout_s)
                return
            if health is not None and health["serving"]:
                return
            if health is not None:  # alive but not serving (its server or lease keep-alive ended)
                ray.kill(replica.actor, no_restart=True)
            dead.append(replica.router_id)
            replica.restarting = asyncio.get_running_loop().create_task(self._restart(replica))

        await asyncio.gather(*(ping(r) for r in self.replicas))
        return dead

    async def _restart(self, replica: RouterReplica) -> None:
        old = replica.router_id
        await self._revoke(replica)
        replica.generation += 1
        replica.restarts += 1
        replica.url = replica.node_id = None
        log.warning("%s: router %s died; starting %s", self.spec.name, old, replica.router_id)
        try:
            await self._start_actor(replica)
        except Exception as e:  # noqa: BLE001 - killed by _start_actor; the next check tries again
            log.error("%s: restarting %s failed: %s", self.spec.name, replica.router_id, e)

    async def _revoke(self, replica: RouterReplica) -> None:
        """Its key goes now, not at the TTL."""
        lease_id, replica.lease_id = replica.lease_id, None
        if lease_id is None:
            return
        try:
            await self.client.revoke_lease(lease_id)
        except Exception as e:  # noqa: BLE001 - expired or revoked already, or etcd away: the TTL finishes it
            log.info("revoking the lease of %s: %s", replica.router_id, e)

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        """:meth:`check` every ``interval_s`` until ``stop`` is set; a failed pass is logged, not fatal."""
        while not stop.is_set():
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - keep watching through a Ray blip
                log.warning("%s: router check failed: %s: %s", self.spec.name, type(e).__name__, e)
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    def describe(self) -> list[dict]:
        return [{"router_id": r.router_id, "url": r.url, "node_id": r.node_id, "restarts": r.restarts}
                for r in self.replicas]

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop every actor (deregister, finish in-flight requests), kill it, revoke what is left of
        its lease. Safe after a partial start and twice."""
        for r in self.replicas:
            if r.restarting is not None and not r.restarting.done():
                r.restarting.cancel()
        await asyncio.gather(*(r.restarting for r in self.replicas if r.restarting), return_exceptions=True)

        async def stop_one(r: RouterReplica) -> None:
            if r.actor is None:
                return
            try:
                await asyncio.wait_for(r.actor.stop.remote(), grace_s)
                r.lease_id = None  # revoked by its own deregistration
            except Exception as e:  # noqa: BLE001 - dead or stuck: killing it is the stop
                log.info("stopping %s: %s: %s", r.router_id, type(e).__name__, e)
            ray.kill(r.actor, no_restart=True)
            r.actor = None
            await self._revoke(r)

        await asyncio.gather(*(stop_one(r) for r in self.replicas))
        self.replicas = []
