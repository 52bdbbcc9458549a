"""``shoal router``: one router replica as a process of its own, its workers found through etcd.

This is what a Kubernetes router Deployment runs: no Ray, no GPU, no torch. The order of things:

1. connect to etcd (``--etcd``; retried until ``--ready-timeout``: an etcd pod may still be starting);
2. read the deployment's spec that ``shoal launch`` puts under ``<prefix>/<name>/spec`` (waited for:
   a router pod may start before its launcher);
3. run an :class:`~shoal.cluster.etcd_router.EtcdRouter`: listen (``/health`` answers), follow worker
   membership, wait until a worker is healthy, then serve (``/ready`` 200) and register under
   ``routers/<router id>``;
4. on SIGTERM / Ctrl-C: deregister, drain (``--drain-timeout``), exit 0.

Placement (policy, block size, the disaggregation threshold) comes from the spec, so every router of
a deployment places alike; the HTTP edge (limits, CORS, the API key) comes from the router flags,
generated from ``RouterConfig``. The API key may come from ``$SHOAL_API_KEY`` (a Kubernetes Secret).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from shoal.cluster.spec import DeploymentSpec


def _say(message: str) -> None:
    print(f"shoal router: {message}", flush=True)


async def _retry(attempt, timeout_s: float, what: str, interval_s: float = 0.5):
    """``await attempt()`` until it returns something other than None (a ConnectionError counts as
    None); a ValueError naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = ""
    while True:
        try:
            got = await attempt()
            if got is not None:
                return got
        except ConnectionError as e:
            last = f" ({e})"
        if loop.time() > deadline:
            raise ValueError(f"{what} within {timeout_s:g} s{last}")
        await asyncio.sleep(interval_s)


async def wait_for_spec(client, deployment: str, prefix: str, timeout_s: float) -> DeploymentSpec:
    """The spec the deployment's launcher put in etcd, once it is there."""
    from shoal.cluster.registry import get_spec

    return await _retry(lambda: get_spec(client, deployment, prefix), timeout_s,
                        f"no spec of deployment {deployment!r} appeared under {prefix} in etcd "
                        "(is its `shoal launch` running?)")


def router_id(args: argparse.Namespace) -> str:
    """``--router-id``, else this host's name (a pod's name in Kubernetes: unique and stable per pod)."""
    return args.router_id or socket.gethostname()


async def run_router(args: argparse.Namespace, config) -> int:
    from shoal.cluster.etcd_router import EtcdRouter
    from shoal.cluster.registry import connect

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await _retry(lambda: connect(args.etcd, timeout_s=2.0), args.ready_timeout,
                          f"etcd {args.etcd} did not answer")
    router = None
    try:
        spec = await wait_for_spec(client, args.deployment, args.prefix, args.ready_timeout)
        _say(f"deployment {spec.name!r} ({spec.model}, policy {spec.router.policy}): waiting for a worker")
        router = EtcdRouter(spec, client, host=args.host, port=args.port, config=config,
                            health_interval_s=config.health_interval_s, tokenizer=args.tokenizer,
                            router_id=router_id(args), lease_ttl_s=args.lease_ttl,
                            advertise_host=args.advertise_host or socket.gethostname(),
                            ready_timeout_s=args.ready_timeout, drain_timeout_s=args.drain_timeout)
        starting = loop.create_task(router.start())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start raises here
            _say(f"ready on {router.url}/v1 (router id {router.router_id})")
            await stop.wait()
        else:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        stopping.cancel()
    finally:
        if router is not None:
            await router.stop()
        await client.close()
    _say("stopped")
    return 0


def router_main(args: argparse.Namespace) -> int:
    from shoal.cluster.flags import api_key, edge_config
    from shoal.cluster.serve import run_loop

    for name in ("ready_timeout", "drain_timeout"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    config = edge_config(args, api_key=api_key(args, os.environ))
    try:
        return run_loop(run_router(args, config))
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"shoal router: error: {e}", file=sys.stderr)
        return 1
