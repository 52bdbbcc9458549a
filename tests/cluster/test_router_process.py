"""``shoal router`` as a process of its own: a real etcd, one real worker process registered there the way
a worker actor registers itself, the router subprocess finding it through etcd, a streamed chat answer,
the router's own registration, and a SIGTERM drain that leaves no key. Also: the one-line errors of a
router that finds no spec, and ``shoal launch --takeover-wait``'s wait for a dead launcher's workers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest
from tests.cluster.serve_support import TINY, sse_events
from tests.process_support import OutputLines

from shoal.cluster.launch import wait_for_no_workers
from shoal.cluster.registry import WorkerRegistration, connect, list_routers, put_spec
from shoal.cluster.spec import DeploymentSpec
from shoal.cluster.worker_process import WorkerProcess
from shoal.router.worker_client import GrpcWorkerClient

NAME = "router-proc"


def spec_for(etcd_endpoint: str) -> DeploymentSpec:
    engine = dict(zip([a.removeprefix("--").replace("-", "_") for a in TINY[2::2]], TINY[3::2]))
    return DeploymentSpec.from_dict({
        "name": NAME, "model": TINY[1],
        "pools": {"unified": {"replicas": 1, "engine": {**engine, "device": "cpu", "num_kv_blocks": 64}}},
        "router": {"policy": "prefix_aware"}, "etcd": {"endpoints": etcd_endpoint}})


def router_command(etcd: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "shoal.cluster.cli", "router", "--etcd", etcd, "--deployment", NAME,
            "--host", "127.0.0.1", "--port", "0", "--advertise-host", "127.0.0.1", *extra]


Lines = OutputLines  # the router child's output


def test_router_process_serves_a_deployment_found_in_etcd(etcd_server):
    worker = WorkerProcess("unified-0-0", [*TINY, "--device", "cpu", "--num-kv-blocks", "64"])
    worker.start()
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(connect(etcd_server.endpoint))
    proc = None
    try:
        endpoint = worker.wait_ready(120)
        spec = spec_for(etcd_server.endpoint)
        info = loop.run_until_complete(_info(worker.worker_id, endpoint))
        reg = loop.run_until_complete(WorkerRegistration(client, NAME, info, endpoint, ttl_s=5).start())
        # The router starts before the spec is there (a pod before its launcher): it waits for it.
        proc = subprocess.Popen(router_command(etcd_server.endpoint, "--router-id", "r-a"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = Lines(proc)
        loop.run_until_complete(put_spec(client, spec))
        url = out.wait_for(r"ready on (http://\S+)/v1", 60).group(1)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 200
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "model": TINY[1], "stream": True, "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status_code == 200
            events = sse_events(resp.iter_lines())
        assert events[-1] == "[DONE]" and len(events) > 2
        routers = loop.run_until_complete(list_routers(client, NAME))
        assert [(r.router_id, r.url) for r in routers] == [("r-a", url)]
        proc.terminate()
        assert proc.wait(30) == 0, out.text()
        assert loop.run_until_complete(list_routers(client, NAME)) == []  # deregistered on the way out
        loop.run_until_complete(reg.deregister())
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        worker.stop()
        loop.run_until_complete(client.close())
        loop.close()


async def _info(worker_id: str, endpoint: str):
    handle = GrpcWorkerClient(worker_id, endpoint)
    try:
        return await handle.get_info()
    finally:
        await handle.close()


def test_router_without_a_spec_says_so_in_one_line(etcd_server):
    out = subprocess.run(router_command(etcd_server.endpoint, "--ready-timeout", "1"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"shoal: error: no spec of deployment {NAME!r} appeared under /shoal in etcd (is its `shoal launch` "
        "running?) within 1 s"]


def test_router_without_etcd_says_so_in_one_line():
    out = subprocess.run(router_command("127.0.0.1:9", "--ready-timeout", "1"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("shoal: error: etcd 127.0.0.1:9 did not answer within 1 s (no etcd endpoint answered")


def test_takeover_waits_for_a_dead_launchers_workers_then_refuses_a_live_one(etcd_server):
    from shoal.workers.protocol import WorkerInfo

    async def go():
        client = await connect(etcd_server.endpoint)
        spec = spec_for(etcd_server.endpoint)
        info = WorkerInfo("unified-0-0", "m", 16, 512)
        try:
            # A dead launcher's worker: its key stays until its lease (2 s) runs out.
            dead = await WorkerRegistration(client, NAME, info, "127.0.0.1:1", ttl_s=2).start()
            await dead.abandon()
            await asyncio.wait_for(wait_for_no_workers(client, spec, etcd_server.endpoint, 30), 30)
            live = await WorkerRegistration(client, NAME, info, "127.0.0.1:1", ttl_s=5).start()
            with pytest.raises(ValueError, match=r"already has workers registered .* after waiting 1 s; "
                                                 r"`shoal stop router-proc"):
                await wait_for_no_workers(client, spec, etcd_server.endpoint, 1)
            await live.deregister()
        finally:
            await client.close()

    asyncio.run(go())


def test_router_and_launch_flags_parse():
    from shoal.cluster.cli import build_parser

    args = build_parser().parse_args(["router", "--etcd", "e:2379", "--deployment", "d", "--max-n", "4"])
    assert (args.etcd, args.deployment, args.max_n, args.port) == ("e:2379", "d", 4, 8000)
    assert not hasattr(args, "placement")  # the spec sets placement for every router of a deployment
    args = build_parser().parse_args(["launch", "-f", "x.yaml", "--no-routers", "--takeover-wait", "30"])
    assert (args.routers, args.takeover_wait) == (False, 30.0)
    assert json.loads(json.dumps(vars(build_parser().parse_args(["launch", "-f", "x.yaml"]))["routers"]))
