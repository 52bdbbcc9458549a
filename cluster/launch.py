"""``shoal launch`` / ``shoal status`` / ``shoal stop``: a deployment on an existing Ray cluster.

``shoal launch -f deploy.yaml`` connects to Ray (``--address``, else ``$RAY_ADDRESS``, else ``auto``),
finds etcd (``--etcd``, else the spec's endpoints; when neither answers and the spec names the default
``127.0.0.1:2379``, it starts an embedded etcd on this node), starts the :class:`Controller`, then a
router in this process whose worker pool follows etcd membership (:class:`EtcdRouter`). It stays in
the foreground watching the replicas until SIGTERM / Ctrl-C or ``shoal stop NAME``, then stops the
router and the deployment. That makes it a Ray job entrypoint as is:
``ray job submit --working-dir . -- shoal launch -f deploy.yaml`` (``ray job stop`` sends SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from shoal.cluster.etcd import EmbeddedEtcd
from shoal.cluster.spec import DeploymentSpec, EtcdSpec, load_spec

log = logging.getLogger(__name__)


def _say(message: str) -> None:
    print(f"shoal launch: {message}", flush=True)


# -- the router, fed by etcd ----------------------------------------------------------------------

class EtcdRouter:
    """The OpenAI router on uvicorn in this process's event loop; its pool follows etcd membership.

    A ``MembershipWatcher`` adds a ``GrpcWorkerClient`` for each registered worker and removes it when
    the key goes (drained, lease expired or revoked). The pool's health polls cover the gap between
    a worker dying and its key going: a failed poll takes it out of placement at once.
    """

    def __init__(self, spec: DeploymentSpec, client, *, host: str = "0.0.0.0", port: int | None = None,
                 health_interval_s: float = 1.0, tokenizer: str | None = None) -> None:
        self.spec, self.client = spec, client
        self.host = host
        self.port = spec.router.port if port is None else port
        self.health_interval_s = health_interval_s
        self.tokenizer = tokenizer
        self.pool = None
        self.watcher = None
        self._server = None
        self._task: asyncio.Task | None = None
        self.bound: tuple[str, int] | None = None

    def _tokenizer(self):
        from shoal.workers.models.loader import tokenizer_path
        from shoal.workers.tokenizer import Tokenizer

        engine = next(iter(self.spec.pools.values())).engine
        path = self.tokenizer or engine.get("tokenizer") or tokenizer_path(self.spec.model)
        if path is None:
            raise ValueError(f"model {self.spec.model!r} has no tokenizer the router can load; "
                             "set pools.<role>.engine.tokenizer in the spec")
        return Tokenizer.from_path(path)

    async def start(self) -> int:
        """Listen, then follow membership; -> the bound port."""
        import uvicorn

        from shoal.cluster.registry import MembershipWatcher
        from shoal.cluster.serve import bind_socket
        from shoal.router.app import create_app
        from shoal.router.config import RouterConfig
        from shoal.router.worker_client import GrpcWorkerClient
        from shoal.router.worker_pool import make_pool

        router = self.spec.router
        options = dict(router.policy_options)
        if router.policy == "prefix_aware":
            options.setdefault("block_size", self.spec.block_size)
        config = RouterConfig(placement=router.policy, placement_options=options,
                              health_interval_s=self.health_interval_s,
                              disagg_min_prefill_tokens=router.disagg_min_prefill_tokens)
        self.pool = make_pool(config)
        app = create_app(config, self.pool, await asyncio.to_thread(self._tokenizer))
        sock = bind_socket(self.host, self.port)
        self.bound = sock.getsockname()[:2]

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the launcher owns SIGTERM / SIGINT
                yield

        self._server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises uvicorn's error
                raise RuntimeError("the router exited at start")
            await asyncio.sleep(0.02)

        def on_add(record):  # the pool learns each worker's role (unified / prefill / decode) from it
            self.pool.add(GrpcWorkerClient(record.worker_id, record.endpoint))

        async def on_remove(worker_id):
            await self.pool.remove_worker(worker_id)

        self.watcher = await MembershipWatcher(self.client, self.spec.name, prefix=self.spec.etcd.prefix,
                                               on_add=on_add, on_remove=on_remove).start()
        return self.bound[1]

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        if self._server is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)  # the lifespan closes the pool


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

def _connect_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


async def _launch(spec: DeploymentSpec, args: argparse.Namespace) -> int:
    import ray

    from shoal.cluster.controller import Controller, control_key
    from shoal.cluster.registry import list_workers

    node_ip = args.host_ip or ray.util.get_node_ip_address()
    endpoints, client, embedded = await resolve_etcd(spec, args.etcd, node_ip)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    controller = router = None
    try:
        if await list_workers(client, spec.name, spec.etcd.prefix):
            raise ValueError(f"deployment {spec.name!r} already has workers registered in etcd at {endpoints}; "
                             f"`shoal stop {spec.name} --etcd {endpoints}` first")
        await client.delete(control_key(spec.name, spec.etcd.prefix).encode())  # an old stop is not for us
        controller = Controller(spec, client, etcd_endpoints=endpoints, lease_ttl_s=args.lease_ttl,
                                start_timeout_s=args.start_timeout)
        n = sum(p.replicas for p in spec.pools.values())
        _say(f"starting {spec.name!r}: {n} replica(s) of {spec.model}, etcd {endpoints}")
        started = time.monotonic()
        await controller.start()
        router = EtcdRouter(spec, client, host=args.host, port=args.port)
        port = await router.start()
        shown = node_ip if args.host in ("0.0.0.0", "::") else args.host
        _say(f"ready in {time.monotonic() - started:.1f} s: router on http://{shown}:{port}/v1 "
             f"(model {spec.model!r}, etcd {endpoints})")
        why = await controller.run(stop, interval_s=args.check_interval)
        _say(f"stopping {spec.name!r} ({'shoal stop' if why == 'control' else 'signal'})")
    finally:
        if router is not None:
            await router.stop()
        if controller is not None:
            await controller.stop()
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
    _connect_ray(args.address)
    try:
        return asyncio.run(_launch(spec, args))
    finally:
        import ray

        ray.shutdown()


# -- status and stop ------------------------------------------------------------------------------

async def _status(args: argparse.Namespace) -> int:
    from shoal.cluster.controller import STOP, control_key
    from shoal.cluster.registry import connect, get_spec, list_deployments, list_workers

    client = await connect(args.etcd)
    try:
        names = await list_deployments(client, args.prefix)
        if not names:
            print(f"no deployments under {args.prefix} in etcd {args.etcd}")
        for name in names:
            spec = await get_spec(client, name, args.prefix)
            workers = await list_workers(client, name, args.prefix)
            control = await client.get(control_key(name, args.prefix).encode())
            want = sum(p.replicas for p in spec.pools.values()) if spec else "?"
            state = " (stopping)" if control is not None and control.value == STOP else ""
            model = spec.model if spec else "?"
            print(f"{name}: model {model}, {len(workers)}/{want} workers registered{state}")
            for w in workers:
                print(f"  {w.worker_id:<16} {w.role:<8} {w.endpoint:<22} node {str(w.meta.get('node_id', '?'))[:12]}")
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
