"""``WorkerActor``: one worker replica as an async Ray actor — engine, gRPC server, etcd registration.

The actor is rank 0 of its replica: it builds the engine from the pool's ``EngineConfig``, serves it
over gRPC on its node's IP and a free port, and registers a ``WorkerRecord`` under a lease in etcd.
The lease's keep-alive is a task on the actor's own asyncio loop, so the key lives exactly as long
as the actor process does (a killed actor drops out of etcd within the TTL). With
``tensor_parallel_size > 1`` the engine itself starts the other ranks as local processes
(``workers/executor/tp_group.py``) inside the resources the replica's placement group reserved.

The engine comes from :func:`shoal.workers.server.build_engine` (the one ``shoal serve``'s
worker processes use), with the pool's ``engine`` options and its ``kv_transfer`` settings (DisaggConfig).

Importing this module is cheap (the controller does, on the driver); torch and the engine are
imported by ``start()``, inside the actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Mapping

log = logging.getLogger(__name__)


class WorkerActor:
    """Wrap with ``ray.remote(WorkerActor)`` (the controller does, with the replica's placement group).

    Life: ``start()`` (load, listen, register; returns the endpoint) → serving → ``drain()``
    (deregister at once so routers stop placing, let in-flight requests finish, stop the server and
    the engine). Construction is cheap; a failure in ``start()`` leaves nothing registered.
    """

    def __init__(self, deployment: str, role: str, worker_id: str, model: str, engine: Mapping[str, Any],
                 etcd_endpoints: str, *, tensor_parallel_size: int = 1, prefix: str = "/shoal",
                 lease_ttl_s: int = 10, host: str | None = None, meta: Mapping[str, Any] | None = None,
                 kv_transfer: Mapping[str, Any] | None = None) -> None:
        self.deployment, self.role, self.worker_id = deployment, role, worker_id
        self.model, self.engine_options = model, dict(engine)
        self.kv_transfer = dict(kv_transfer or {})  # DisaggConfig fields; unset ones keep their defaults
        self.etcd_endpoints, self.prefix, self.lease_ttl_s = etcd_endpoints, prefix, lease_ttl_s
        self.tensor_parallel_size = tensor_parallel_size
        self.host = host
        self.meta = dict(meta or {})
        self._engine = None  # AsyncEngine
        self._server = None  # grpc.aio.Server
        self._servicer = None
        self._client = None  # aetcd.Client
        self._registration = None  # WorkerRegistration
        self._endpoint: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> str:
        """Load the engine (in a thread: the loop keeps answering), serve, register; -> ``host:port``."""
        import ray

        from shoal.cluster.registry import WorkerRegistration, connect
        from shoal.workers.rpc.servicer import WorkerServicer, start_worker_server

        if self._endpoint is not None:
            return self._endpoint
        host = self.host or ray.util.get_node_ip_address()
        self._engine = await asyncio.to_thread(self._build_engine)
        try:
            self._servicer = WorkerServicer(self._engine)
            self._server = await start_worker_server(self._engine, host, 0, servicer=self._servicer)
            endpoint = f"[{host}]:{self._server.bound_port}" if ":" in host else f"{host}:{self._server.bound_port}"
            self._client = await connect(self.etcd_endpoints)
            meta = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **self.meta}
            info = dataclasses.replace(self._engine.info(), tensor_parallel_size=self.tensor_parallel_size)
            self._registration = await WorkerRegistration(
                self._client, self.deployment, info, endpoint, ttl_s=self.lease_ttl_s, prefix=self.prefix,
                meta=meta).start()
        except BaseException:
            await self._teardown(grace_s=0.0)
            raise
        self._endpoint = endpoint
        log.info("worker %s serving on %s, registered in etcd", self.worker_id, endpoint)
        return endpoint

    async def drain(self, grace_s: float = 5.0) -> None:
        """Deregister (routers drop us on the watch event), finish in-flight requests, stop. Idempotent."""
        if self._registration is not None:
            await self._registration.deregister()
        await self._teardown(grace_s)

    # -- queries --------------------------------------------------------------------------------

    async def endpoint(self) -> str | None:
        return self._endpoint

    async def lease_id(self) -> int | None:
        """The etcd lease the worker key hangs on: the controller revokes it when this actor dies."""
        return self._registration.lease_id if self._registration is not None else None

    async def health(self) -> dict:
        """``{"serving", "registered", "engine_alive", "endpoint"}``; serving needs all three."""
        engine_alive = self._engine is not None and self._engine.alive()
        registered = self._registration is not None and self._registration.alive
        return {"serving": bool(engine_alive and registered and self._server is not None),
                "registered": registered, "engine_alive": engine_alive, "endpoint": self._endpoint,
                "worker_id": self.worker_id}

    async def load(self) -> tuple | None:
        """``(WorkerLoad, WorkerTotals)`` now: the queue and KV figures routers also read, and the
        counters the autoscaler derives arrival rate and request mix from. ``None`` before ``start()``.
        The controller asks this of its own actors (no gRPC channel of its own to keep)."""
        engine = self._engine
        if engine is None:
            return None
        totals = await asyncio.to_thread(engine.metrics.totals)  # waits (bounded) for the engine thread
        return engine.load(), dataclasses.replace(totals, oldest_wait_s=engine.oldest_wait_s())

    async def disagg_config(self) -> dict | None:
        """The engine's DisaggConfig as a dict (None before ``start()``): what its KV transfers use."""
        return dataclasses.asdict(self._engine.disagg_config) if self._engine is not None else None

    # -- test hook ------------------------------------------------------------------------------

    async def wedge_for_test(self, seconds: float) -> None:
        """For tests only: block this actor's event loop for ``seconds``, as a blocking call made on
        the loop (or one stuck in C code holding the GIL) would. The process stays alive while
        health pings, gRPC and the lease keep-alive all go unanswered: what the controller's hang
        detection must catch. Nothing in shoal calls it."""
        time.sleep(seconds)  # on purpose: not asyncio.sleep

    # -- helpers --------------------------------------------------------------------------------

    def _build_engine(self):
        from shoal.workers.server import build_engine

        options = {**self.engine_options, "tensor_parallel_size": self.tensor_parallel_size}
        return build_engine(self.model, options, worker_id=self.worker_id, role=self.role,
                            kv_transfer=self.kv_transfer)

    async def _teardown(self, grace_s: float) -> None:
        server, self._server = self._server, None
        if server is not None:
            if self._servicer is not None:
                self._servicer.begin_shutdown()
            await server.stop(grace_s)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close_kv_peers()
            await asyncio.to_thread(engine.shutdown)
        if self._registration is not None:
            await self._registration.abandon()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        self._endpoint = None
