"""``shoal launch`` / ``shoal status`` / ``shoal stop``: a deployment on an existing Ray cluster.

``shoal launch -f deploy.yaml`` connects to Ray (``--address``, else ``$RAY_ADDRESS``, else ``auto``),
finds etcd (``--etcd``, else the spec's endpoints; when neither answers and the spec names the default
``127.0.0.1:2379``, it starts an embedded etcd on this node), starts the :class:`Controller`, then
``router.replicas`` routers whose worker pools follow etcd membership (:class:`EtcdRouter`): router 0
in this process, the others as Ray actors on other nodes (``cluster/ray_router.py``). It stays in
the foreground watching workers and router actors until SIGTERM / Ctrl-C or ``shoal stop NAME``,
then stops the routers and the deployment. That makes it a Ray job entrypoint as is:
``ray job submit --working-dir . -- shoal launch -f deploy.yaml`` (``ray job stop`` sends SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from shoal.cluster.etcd import EmbeddedEtcd
from shoal.cluster.etcd_router import EtcdRouter
from shoal.cluster.spec import DeploymentSpec, EtcdSpec, load_spec

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"shoal launch: {message}", flush=True)


# -- etcd -----------------------------------------------------------------------------------------

async def resolve_etcd(spec: DeploymentSpec, cli_etcd: str | None, node_ip: str):
    """-> (endpoints for everyone, a connected client, the EmbeddedEtcd we started or None)."""
    from shoal.cluster.registry import connect

    if cli_etcd:
        return cli_etcd, await connect(cli_etcd), None
    endpoints = ",".join(spec.etcd.endpoints)
    try:
        return endpoints, await connect(endpoints, timeout_s=2.0), None
    except ConnectionError:
        if spec.etcd.endpoints != EtcdSpec().endpoints:
            raise  # the spec names an etcd: it must answer
    # The default port first, so `shoal status` / `shoal stop` on this node work without --etcd.
    port = int(EtcdSpec().endpoints[0].rsplit(":", 1)[1])
    data_dir = tempfile.mkdtemp(prefix=f"shoal-etcd-{spec.name}-")
    etcd = None
    try:
        etcd = EmbeddedEtcd(data_dir, host=node_ip, client_port=port).start()
        client = await connect(etcd.endpoint)
        if not etcd.running:  # the /health that answered was another etcd's, going away: not ours
            raise ConnectionError(f"the embedded etcd on port {port} exited")
    except (RuntimeError, OSError):  # the port is taken (by something that is not an etcd answering us)
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        etcd = EmbeddedEtcd(tempfile.mkdtemp(prefix=f"shoal-etcd-{spec.name}-"), host=node_ip).start()
        client = await connect(etcd.endpoint)
    _say(f"no etcd answered at {endpoints}: started an embedded etcd at {etcd.endpoint} "
         f"(pass --etcd {etcd.endpoint} to shoal status / stop)")
    return etcd.endpoint, client, etcd


# -- launch ---------------------------------------------------------------------------------------

async def wait_for_no_workers(client, spec: DeploymentSpec, endpoints: str, wait_s: float) -> None:
    """Return once no worker of ``spec`` is registered; after ``wait_s`` refuse with a ValueError.

    A launcher that died (a Kubernetes pod killed, a node lost) takes its actors with it (Ray
    fate-shares an actor with the driver that made it), and their keys go when their leases run out:
    a restarted launcher waits that long (``--takeover-wait``), then starts the deployment afresh.
    Keys that outlast the wait belong to a launcher that is still alive: two must not run one deployment.
    """
    from shoal.cluster.registry import list_workers

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    said = False
    while await list_workers(client, spec.name, spec.etcd.prefix):
        if loop.time() >= deadline:
            raise ValueError(f"deployment {spec.name!r} already has workers registered in etcd at {endpoints}"
                             + (f" after waiting {wait_s:g} s" if wait_s else "")
                             + f"; `shoal stop {spec.name} --etcd {endpoints}` first")
        if not said:
            _say(f"workers of {spec.name!r} are still registered; waiting up to {wait_s:g} s for their leases "
                 "to run out (--takeover-wait)")
            said = True
        await asyncio.sleep(0.5)

def _connect_ray(address: str | None, timeout_s: float) -> None:
    """Join the Ray cluster at ``address``. A Ray Client address (``ray://``) is retried until
    ``timeout_s``: a launcher pod can start before the head answers, and the head's client server can
    fail one session's start; a connect that never succeeds is one clear error line."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            return
        except ConnectionError as e:
            ray.shutdown()
            if not address.startswith("ray://"):
                raise ValueError(f"cannot connect to the Ray cluster at {address}: {e}") from None
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if time.monotonic() >= deadline:
                raise ValueError(f"cannot connect to the Ray cluster at {address} within {timeout_s:g} s "
                                 f"(--connect-timeout): {reason}") from None
            _say(f"Ray at {address} refused the connection ({reason}); retrying")
            time.sleep(2.0)


class Launch:
    """One deployment on the connected Ray cluster: the workers' :class:`Controller`, router 0 in this
    process, routers 1..N-1 as actors (:class:`RouterReplicas`), and the monitor over both.

    Routers start after the controller (the spec is in etcd and the workers serve by then) and stop
    before it, so none outlives the workers it routes to. :meth:`stop` is safe after a partial start
    and twice. ``node_ip`` is the host router 0's URL names when it binds a wildcard address.
    ``routers=False``: workers only (``shoal launch --no-routers``; the routers run as ``shoal router``).
    """

    def __init__(self, spec: DeploymentSpec, client, *, etcd_endpoints: str, node_ip: str,
                 host: str = "0.0.0.0", port: int | None = None, lease_ttl_s: int = 10,
                 start_timeout_s: float = 600.0, health_interval_s: float = 1.0, hang_timeout_s: float = 60.0,
                 extra_resources_per_rank: dict | None = None, routers: bool = True,
                 autoscale_interval_s: float = 5.0, autoscale_window_s: float = 30.0) -> None:
        import ray

        from shoal.cluster.autoscale.live import Autoscaler, ControllerSource
        from shoal.cluster.controller import Controller
        from shoal.cluster.ray_router import RouterReplicas

        self.spec, self.client, self.node_ip = spec, client, node_ip
        self.host, self.lease_ttl_s, self.health_interval_s = host, lease_ttl_s, health_interval_s
        self.port = spec.router.port if port is None else port
        self.node_id = ray.get_runtime_context().get_node_id()
        self.controller = Controller(spec, client, etcd_endpoints=etcd_endpoints, lease_ttl_s=lease_ttl_s,
                                     start_timeout_s=start_timeout_s, hang_timeout_s=hang_timeout_s,
                                     extra_resources_per_rank=extra_resources_per_rank)
        # Only pools with an autoscaling block are scaled; the rest keep pools.<role>.replicas.
        source = ControllerSource(self.controller, autoscale_window_s, client)
        self.autoscaler = Autoscaler(spec, self.controller, source, client=client, interval_s=autoscale_interval_s,
                                     zero_after_s=autoscale_window_s) if spec.autoscaling else None
        self.router: EtcdRouter | None = None
        self.with_routers = routers
        self.routers = RouterReplicas(spec, client, etcd_endpoints=etcd_endpoints, local_node_id=self.node_id,
                                      host=host, port=self.port, lease_ttl_s=lease_ttl_s,
                                      start_timeout_s=min(start_timeout_s, 120.0),
                                      health_interval_s=health_interval_s)

    @property
    def urls(self) -> list[str]:
        """Every router's ``http://host:port`` (router 0 first); the OpenAI API is under ``/v1``."""
        first = [self.router.url] if self.router is not None and self.router.url else []
        return first + self.routers.urls

    async def start(self) -> list[str]:
        """Workers, then router 0, then the router actors; -> :attr:`urls`. Raises (after removing
        what was made) if any part fails to start."""
        from shoal.cluster.ray_router import router_id

        if self.with_routers:
            self.routers.check_nodes()  # before the workers spend minutes loading
        try:
            await self.controller.start()
            if not self.with_routers:
                return self.urls
            self.router = EtcdRouter(self.spec, self.client, host=self.host, port=self.port,
                                     health_interval_s=self.health_interval_s, router_id=router_id(0),
                                     lease_ttl_s=self.lease_ttl_s, advertise_host=self.node_ip,
                                     meta={"node_id": self.node_id})
            await self.router.start()
            await self.routers.start()
        except BaseException:
            await self.stop()
            raise
        return self.urls

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> str:
        """Watch workers and router actors until ``stop`` is set or ``shoal stop`` asks; -> why
        (``"signal"`` or ``"control"``, from :meth:`Controller.run`)."""
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        watches = [loop.create_task(self.routers.run(done, interval_s))]
        if self.autoscaler is not None:
            watches.append(loop.create_task(self.autoscaler.run(done)))
        try:
            return await self.controller.run(stop, interval_s=interval_s)
        finally:
            done.set()
            await asyncio.gather(*watches, return_exceptions=True)

    async def stop(self) -> None:
        try:
            await self.routers.stop()
            router, self.router = self.router, None
            if router is not None:
                await router.stop()
        finally:  # the workers (placement groups, etcd keys) go whatever happened to the routers
            await self.controller.stop()


async def _launch(spec: DeploymentSpec, args: argparse.Namespace) -> int:
    import ray

    from shoal.cluster.controller import control_key

    node_ip = args.host_ip or ray.util.get_node_ip_address()
    endpoints, client, embedded = await resolve_etcd(spec, args.etcd, node_ip)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    deployment = None
    try:
        await wait_for_no_workers(client, spec, endpoints, args.takeover_wait)
        await client.delete(control_key(spec.name, spec.etcd.prefix).encode())  # an old stop is not for us
        deployment = Launch(spec, client, etcd_endpoints=endpoints, node_ip=node_ip, host=args.host,
                            port=args.port, lease_ttl_s=args.lease_ttl, start_timeout_s=args.start_timeout,
                            hang_timeout_s=args.hang_timeout, routers=args.routers,
                            autoscale_interval_s=args.autoscale_interval, autoscale_window_s=args.autoscale_window)
        n = sum(p.replicas for p in spec.pools.values())
        routers = f"{spec.router.replicas} router(s)" if args.routers else "no routers (--no-routers)"
        _say(f"starting {spec.name!r}: {n} replica(s) of {spec.model}, {routers}, etcd {endpoints}")
        started = time.monotonic()
        urls = [f"{url}/v1" for url in await deployment.start()]
        where = (f"router on {urls[0]}" if len(urls) == 1 else f"{len(urls)} routers on {', '.join(urls)}"
                 if urls else f"{n} worker replica(s) serving; routers run apart")
        _say(f"ready in {time.monotonic() - started:.1f} s: {where} (model {spec.model!r}, etcd {endpoints})")
        why = await deployment.run(stop, interval_s=args.check_interval)
        _say(f"stopping {spec.name!r} ({'shoal stop' if why == 'control' else 'signal'})")
    finally:
        if deployment is not None:
            await deployment.stop()
        await client.close()
        if embedded is not None:
            embedded.stop()
            shutil.rmtree(embedded.data_dir, ignore_errors=True)
    _say(f"{spec.name!r} stopped")
    return 0


def launch(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _connect_ray(args.address, args.connect_timeout)
    try:
        return asyncio.run(_launch(spec, args))
    finally:
        import ray

        ray.shutdown()


# -- status and stop ------------------------------------------------------------------------------

async def _status(args: argparse.Namespace) -> int:
    from shoal.cluster.autoscale.record import list_decisions
    from shoal.cluster.controller import STOP, control_key
    from shoal.cluster.registry import connect, get_spec, list_deployments, list_routers, list_workers

    client = await connect(args.etcd)
    try:
        names = await list_deployments(client, args.prefix)
        if not names:
            print(f"no deployments under {args.prefix} in etcd {args.etcd}")
        for name in names:
            spec = await get_spec(client, name, args.prefix)
            workers = await list_workers(client, name, args.prefix)
            routers = await list_routers(client, name, args.prefix)
            control = await client.get(control_key(name, args.prefix).encode())
            decisions = await list_decisions(client, name, args.prefix)
            want = sum(decisions[r].desired if r in decisions else p.replicas
                       for r, p in spec.pools.items()) if spec else "?"
            want_routers = spec.router.replicas if spec else "?"
            state = " (stopping)" if control is not None and control.value == STOP else ""
            model = spec.model if spec else "?"
            print(f"{name}: model {model}, {len(workers)}/{want} workers registered, "
                  f"{len(routers)}/{want_routers} routers{state}")
            for pool, d in sorted(decisions.items()):
                print(f"  autoscale {pool}: desired {d.desired}, current {d.current} ({d.ready} serving), "
                      f"{d.policy}: {d.reason}")
            for w in workers:
                print(f"  {w.worker_id:<16} {w.role:<8} {w.endpoint:<22} node {str(w.meta.get('node_id', '?'))[:12]}")
            for r in routers:
                print(f"  {r.router_id:<16} {'router':<8} {r.url + '/v1':<22} node "
                      f"{str(r.meta.get('node_id', '?'))[:12]}")
    finally:
        await client.close()
    return 0


async def _stop(args: argparse.Namespace) -> int:
    import aetcd
    from shoal.cluster.controller import STOP, control_key
    from shoal.cluster.registry import connect, list_deployments

    client = await connect(args.etcd)
    try:
        if args.name not in await list_deployments(client, args.prefix):
            print(f"shoal stop: no deployment {args.name!r} in etcd {args.etcd}", file=sys.stderr)
            return 1
        await client.put(control_key(args.name, args.prefix).encode(), STOP)
        print(f"shoal stop: asked {args.name!r} to stop; waiting up to {args.wait:.0f} s", flush=True)
        deadline = time.monotonic() + args.wait
        while True:
            try:
                if args.name not in await list_deployments(client, args.prefix):
                    break
            except aetcd.exceptions.ConnectionFailedError:  # an embedded etcd ends with its launcher
                print(f"shoal stop: etcd {args.etcd} went away with {args.name!r}'s launcher", flush=True)
                break
            if time.monotonic() > deadline:
                print(f"shoal stop: {args.name!r} still has keys in etcd after {args.wait:.0f} s "
                      "(is its `shoal launch` running?)", file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        print(f"shoal stop: {args.name!r} stopped", flush=True)
        return 0
    finally:
        await client.close()


def _run_etcd_command(name: str, main) -> int:
    try:
        return asyncio.run(main)
    except ConnectionError as e:  # one clear line: which etcd, and that --etcd picks another
        print(f"shoal {name}: {e} (pass --etcd host:port)", file=sys.stderr)
        return 1


def status(args: argparse.Namespace) -> int:
    return _run_etcd_command("status", _status(args))


def stop(args: argparse.Namespace) -> int:
    return _run_etcd_command("stop", _stop(args))
