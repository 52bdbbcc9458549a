"""``EtcdRouter``: the OpenAI router on a ``RouterHost`` in this process's event loop, its pool following etcd.

Its own module because both ``shoal launch`` (router 0, in the launcher) and the Ray router actors
(``cluster/ray_router.py``, routers 1..N-1) run one; each of those imports it, neither the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid

from shoal.cluster.autoscale.record import list_decisions
from shoal.cluster.registry import LeasedKey, MembershipWatcher, RouterRegistration, demand_key, demand_value
from shoal.cluster.spec import DeploymentSpec
from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.host import RouterHost
from shoal.router.metrics import RouterMetrics
from shoal.router.worker_client import GrpcWorkerClient
from shoal.router.worker_pool import make_pool
from shoal.workers.models.files import tokenizer_path
from shoal.workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Held-request bound when the spec lets a pool scale to zero and the router's config sets none.
DEFAULT_COLD_START_WAIT_S = 60.0


class EtcdRouter:
    """The OpenAI router on a :class:`~shoal.router.host.RouterHost` in this process's event loop; its
    pool follows etcd membership.

    A ``MembershipWatcher`` adds a ``GrpcWorkerClient`` for each registered worker and removes it when
    the key goes (drained, lease expired or revoked). The pool's health polls cover the gap between
    a worker dying and its key going: a failed poll takes it out of placement at once.

    Start order: listen (``/health`` answers), follow membership, wait until a worker that generates
    is healthy (``ready_timeout_s``), and only then serve (``/ready`` 200) and, with a ``router_id``,
    register under ``routers/<router_id>`` (a lease of ``lease_ttl_s``), so a balancer that reads etcd
    never sends to a router that cannot answer. :meth:`stop` deregisters first, then drains.
    ``advertise_host`` is the host its URL names when it binds a wildcard address (the node's IP).
    ``config``: the router's edge settings (limits, CORS, API key); its placement fields are the spec's.
    """

    def __init__(self, spec: DeploymentSpec, client, *, host: str = "0.0.0.0", port: int | None = None,
                 health_interval_s: float = 1.0, tokenizer: str | None = None, router_id: str | None = None,
                 lease_ttl_s: int = 10, advertise_host: str | None = None, meta: dict | None = None,
                 ready_timeout_s: float = 600.0, drain_timeout_s: float = 30.0,
                 config: RouterConfig | None = None) -> None:
        self.spec, self.client = spec, client
        self.base_config = config or RouterConfig()  # the HTTP edge; placement comes from the spec
        self.host = host
        self.port = spec.router.port if port is None else port
        self.health_interval_s = health_interval_s
        self.tokenizer = tokenizer
        self.router_id, self.lease_ttl_s, self.meta = router_id, lease_ttl_s, dict(meta or {})
        self.advertise_host = advertise_host
        self.ready_timeout_s, self.drain_timeout_s = ready_timeout_s, drain_timeout_s
        self.pool = None
        self.watcher = None
        self.registration = None  # RouterRegistration, with a router_id
        self.host_server: RouterHost | None = None
        self.metrics = RouterMetrics()
        self._autoscale_task: asyncio.Task | None = None
        self._demand: LeasedKey | None = None  # put while this router holds requests for a worker
        self._full: LeasedKey | None = None  # put while it holds requests for a worker with room
        self._room = None  # the app's WorkerRoom (max_open_per_worker)

    @property
    def bound(self) -> tuple[str, int] | None:
        return self.host_server.bound if self.host_server is not None else None

    @property
    def url(self) -> str | None:
        """``http://host:port`` as clients reach it (the OpenAI API is under ``/v1``); None before start."""
        if self.bound is None:
            return None
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = self.advertise_host or host
        return f"http://[{host}]:{self.bound[1]}" if ":" in host else f"http://{host}:{self.bound[1]}"

    @property
    def serving(self) -> bool:
        """The host serves and, with a router_id, the registration's keep-alive runs."""
        up = self.host_server is not None and self.host_server.serving
        return up and (self.registration is None or self.registration.alive)

    def _tokenizer(self) -> Tokenizer:
        engine = next(iter(self.spec.pools.values())).engine
        path = self.tokenizer or engine.get("tokenizer") or tokenizer_path(self.spec.model)
        if path is None:
            raise ValueError(f"model {self.spec.model!r} has no tokenizer the router can load; "
                             "set pools.<role>.engine.tokenizer in the spec")
        return Tokenizer.from_path(path)

    def router_config(self) -> RouterConfig:
        """The settings it serves with: the edge's (limits, CORS, API key), the spec's placement and tools."""
        router = self.spec.router
        options = dict(router.policy_options)
        if router.policy == "prefix_aware":
            options.setdefault("block_size", self.spec.block_size)
        cold = self.base_config.cold_start_wait_s
        if not cold and any(a.min_replicas == 0 for a in self.spec.autoscaling.values()):
            cold = DEFAULT_COLD_START_WAIT_S  # a pool may be at zero: hold its requests while one starts
        return dataclasses.replace(self.base_config, placement=router.policy, placement_options=options,
                                   health_interval_s=self.health_interval_s, cold_start_wait_s=cold,
                                   disagg_min_prefill_tokens=router.disagg_min_prefill_tokens,
                                   tool_call_parser=router.tool_call_parser, chat_template=router.chat_template)

    async def start(self) -> int:
        """Listen, follow membership, become ready, register; -> the bound port. Raises (leaving
        nothing listening or registered) when any step fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self.bound[1]

    async def _start(self) -> None:
        config = self.router_config()
        self.pool = make_pool(config)
        app = create_app(config, self.pool, await asyncio.to_thread(self._tokenizer), metrics=self.metrics,
                         on_demand=self._signal_demand)
        self._room = app.state.ctx.room
        self.host_server = RouterHost(app, self.host, self.port, drain_timeout_s=self.drain_timeout_s)
        await self.host_server.listen()

        def on_add(record):  # the pool learns each worker's role (unified / prefill / decode) from it
            self.pool.add(GrpcWorkerClient(record.worker_id, record.endpoint))

        async def on_remove(worker_id):  # a drained worker finishes what it has: its calls keep their channel
            await self.pool.remove_worker(worker_id, grace_s=self.drain_timeout_s)

        self.watcher = await MembershipWatcher(self.client, self.spec.name, prefix=self.spec.etcd.prefix,
                                               on_add=on_add, on_remove=on_remove).start()
        if self.spec.autoscaling:
            self._autoscale_task = asyncio.get_running_loop().create_task(self._follow_autoscale())
        # Scale to zero: serve with no worker yet (requests are held while one starts).
        await self.host_server.become_ready(None if config.cold_start_wait_s > 0 else self.ready_timeout_s)
        if self.router_id is not None:
            self.registration = await RouterRegistration(
                self.client, self.spec.name, self.router_id, self.url, ttl_s=self.lease_ttl_s,
                prefix=self.spec.etcd.prefix, meta={"pid": os.getpid(), **self.meta}).start()

    async def _signal_demand(self, held: bool) -> None:
        """Keep ``demand/<router>`` in etcd (leased: it goes if this router dies) while requests are held."""
        if held and self._demand is None:
            key = demand_key(self.spec.name, self.router_id or f"router-{uuid.uuid4().hex[:12]}",
                             self.spec.etcd.prefix)
            self._demand = await LeasedKey(self.client, key, b'{"held": true}', ttl_s=self.lease_ttl_s).start()
        elif not held and self._demand is not None:
            demand, self._demand = self._demand, None
            await demand.deregister()

    async def _report_full(self, held: int) -> None:
        """Keep ``demand/<router>-full`` = ``{"held": n}`` while ``n`` requests wait for a worker below
        max_open_per_worker: the autoscaler counts them as waiting (they reach no worker's count yet)."""
        if held > 0 and self._full is None:
            key = demand_key(self.spec.name, f"{self.router_id or 'router-' + uuid.uuid4().hex[:12]}-full",
                             self.spec.etcd.prefix)
            self._full = await LeasedKey(self.client, key, demand_value(held), ttl_s=self.lease_ttl_s).start()
        elif held > 0 and self._full.value != demand_value(held):
            await self._full.update(demand_value(held))
        elif held == 0 and self._full is not None:
            full, self._full = self._full, None
            await full.deregister()

    async def _follow_autoscale(self) -> None:
        """Each health interval (at least 1 s): copy the autoscaler's etcd records into
        ``shoal_autoscale_{desired,current}_replicas`` (one small range read, so /metrics needs no etcd
        call), and report the requests held for a worker with room."""
        while True:
            try:
                records = await list_decisions(self.client, self.spec.name, self.spec.etcd.prefix)
                self.metrics.observe_autoscale({p: (r.desired, r.current) for p, r in records.items()})
                await self._report_full(self._room.held if self._room is not None else 0)
            except Exception as e:  # noqa: BLE001 - etcd away: keep the last figures, try again
                log.info("reading the autoscaling records: %s: %s", type(e).__name__, e)
            await asyncio.sleep(max(1.0, self.health_interval_s))

    async def stop(self) -> None:
        """Deregister (a balancer reading etcd stops sending here), stop following etcd, then drain
        the host (in-flight requests finish). Safe after a partial start and twice."""
        registration, self.registration = self.registration, None
        if registration is not None:
            await registration.deregister()
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            await watcher.stop()
        for key in (self._demand, self._full):
            if key is not None:
                await key.deregister()
        self._demand = self._full = None
        follower, self._autoscale_task = self._autoscale_task, None
        if follower is not None:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        host, self.host_server = self.host_server, None
        if host is not None:
            await host.stop()  # the app's lifespan closes the pool
