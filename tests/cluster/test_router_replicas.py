"""``router.replicas`` in ``shoal launch``: router 0 in the launcher, router 1 as a Ray actor on the other
node of a real 2-node ``ray.cluster_utils.Cluster``; both registered in a real etcd, both serving the
OpenAI API in front of one tiny worker; a killed router actor is replaced by the monitor; stopping
leaves no router key, actor or listener.

The whole life runs in one test (one Ray cluster, one engine: ~25 s), so pytest-xdist cannot split it
over two processes that would each build the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time

import httpx
import pytest
from ray_support import LoopThread, two_node_cluster, wait_until

import ray  # noqa: E402

from shoal.cluster.cli import main as shoal_main  # noqa: E402
from shoal.cluster.etcd import EmbeddedEtcd  # noqa: E402
from shoal.cluster.launch import Launch  # noqa: E402
from shoal.cluster.ray_router import RouterReplicas  # noqa: E402
from shoal.cluster.registry import (RouterRegistration, connect, delete_deployment, list_deployments,  # noqa: E402
                                    list_routers, list_workers, router_key)
from shoal.cluster.spec import DeploymentSpec  # noqa: E402
from shoal.workers.models.presets import PRESETS  # noqa: E402

NAME = "routers-test"
TTL = 3


def tiny_spec(model_dir, tokenizer, etcd_endpoint: str, routers: int = 2, port: int = 8000) -> DeploymentSpec:
    return DeploymentSpec.from_dict({
        "name": NAME, "model": str(model_dir),
        "pools": {"unified": {"replicas": 1, "resources_per_rank": {"CPU": 1},
                              "engine": {"tokenizer": str(tokenizer), "load_format": "dummy", "device": "cpu",
                                         "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 512,
                                         "max_num_batched_tokens": 512}}},
        "router": {"replicas": routers, "policy": "prefix_aware", "port": port},
        "etcd": {"endpoints": etcd_endpoint}})


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=20, json={
        "model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})


def greedy_text(url: str, model: str, timeout: float = 20.0) -> str:
    """The completion's text once the router answers 200 (a new router may still be connecting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            resp = complete(url, model)
            if resp.status_code == 200:
                body = resp.json()
                assert body["usage"]["completion_tokens"] == 6, body
                return body["choices"][0]["text"]
            last = f"{resp.status_code} {resp.text}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        assert time.monotonic() < deadline, f"{url} did not answer 200 within {timeout} s: {last}"
        time.sleep(0.3)


def test_fixed_port_needs_a_node_per_router(tmp_path):
    """Two routers cannot share a node's fixed port: more routers than nodes is refused up front."""
    spec = tiny_spec(tmp_path, tmp_path, "127.0.0.1:2379", routers=3, port=8000)
    replicas = RouterReplicas(spec, None, etcd_endpoints="127.0.0.1:2379", local_node_id="n0")
    with pytest.raises(ValueError, match=r"router.replicas=3 on the fixed router port 8000 needs 3 Ray nodes.*has 2"):
        replicas.check_nodes(alive_nodes=2)
    replicas.check_nodes(alive_nodes=3)
    RouterReplicas(spec, None, etcd_endpoints="x:1", local_node_id="n0", port=0).check_nodes(alive_nodes=1)


def test_router_registration_lists_and_deletes(etcd_server):
    """Router keys: listed sorted, a malformed one skipped, gone with their lease or the deployment."""
    async def go():
        client = await connect(etcd_server.endpoint)
        try:
            b = await RouterRegistration(client, NAME, "router-1-0", "http://10.0.0.2:8000", ttl_s=TTL,
                                         meta={"node_id": "nb"}).start()
            a = await RouterRegistration(client, NAME, "router-0-0", "http://10.0.0.1:8000", ttl_s=TTL).start()
            await client.put(router_key(NAME, "junk").encode(), b"{not json")
            assert await list_routers(client, NAME) == [a.record, b.record]
            assert b.record.meta == {"node_id": "nb"} and await list_workers(client, NAME) == []
            assert await b.deregister()
            assert [r.router_id for r in await list_routers(client, NAME)] == ["router-0-0"]
            assert await delete_deployment(client, NAME) == 2  # router-0-0 and the junk key
            assert await list_routers(client, NAME) == [] and await list_deployments(client) == []
            await a.abandon()
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(go(), 30))


@pytest.mark.slow
def test_router_replicas_serve_restart_and_stop(tmp_path_factory, smollm2_path):
    tiny = tmp_path_factory.mktemp("tiny-smol-vocab")
    (tiny / "config.json").write_text(json.dumps(PRESETS["tiny-smollm2-vocab"]))
    with two_node_cluster() as _:
        etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data", unsafe_no_fsync=True).start()
        loop = LoopThread()
        spec = tiny_spec(tiny, smollm2_path, etcd.endpoint)
        client = loop.run(connect(etcd.endpoint))
        launch = Launch(spec, client, etcd_endpoints=etcd.endpoint, node_ip="127.0.0.1", host="127.0.0.1", port=0,
                        lease_ttl_s=TTL, start_timeout_s=120, health_interval_s=0.3)
        stop = asyncio.Event()
        monitor = None
        try:
            started = time.monotonic()
            urls = loop.run(launch.start())
            print(f"2 routers and 1 worker up in {time.monotonic() - started:.1f} s: {urls}")
            monitor = asyncio.run_coroutine_threadsafe(launch.run(stop, interval_s=0.3), loop.loop)
            _serve_and_register(loop, launch, client, spec, urls)
            _status_lists_routers(etcd.endpoint, urls)
            _killed_router_comes_back(loop, launch, client, spec)
            _stop_removes_every_router(loop, launch, client, stop, monitor)
        finally:
            loop.loop.call_soon_threadsafe(stop.set)
            if monitor is not None:
                monitor.result(30)
            loop.run(launch.stop())
            loop.run(client.close())
            loop.close()
            etcd.stop()


def _serve_and_register(loop, launch, client, spec, urls) -> None:
    assert len(urls) == 2 and len(set(urls)) == 2
    texts = [greedy_text(url, spec.model) for url in urls]
    assert texts[0] == texts[1] and texts[0], texts  # same worker, greedy: the same text from either router
    routers = loop.run(list_routers(client, NAME))
    assert [(r.router_id, r.url) for r in routers] == [("router-0-0", urls[0]), ("router-1-0", urls[1])]
    local, remote = (r.meta["node_id"] for r in routers)
    assert local == launch.node_id
    assert remote != local and remote in {n["NodeID"] for n in ray.nodes() if n["Alive"]}  # spread


def _status_lists_routers(endpoint, urls) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert shoal_main(["status", "--etcd", endpoint]) == 0
    out = stdout.getvalue()
    assert f"{NAME}: model " in out and "1/1 workers registered, 2/2 routers" in out, out
    for router_id, url in zip(("router-0-0", "router-1-0"), urls):
        assert any(router_id in line and f"{url}/v1" in line for line in out.splitlines()), out


def _killed_router_comes_back(loop, launch, client, spec) -> None:
    replica = launch.routers.replicas[0]
    old_actor, old_url = replica.actor, replica.url
    ray.kill(old_actor, no_restart=True)
    ids = lambda: [r.router_id for r in loop.run(list_routers(client, NAME))]  # noqa: E731
    # The new actor registers in etcd a moment before its start() returns and the launcher notes its URL.
    took = wait_until(lambda: ids() == ["router-0-0", "router-1-1"] and replica.url is not None, 30,
                      "the monitor replaces the router actor")
    print(f"router actor replaced {took:.1f} s after the kill")
    assert replica.restarts == 1 and replica.url and replica.actor is not old_actor
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(old_actor.health.remote(), timeout=10)
    if replica.url != old_url:  # with port 0 the new router may, rarely, be given the old one's port again
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{old_url}/v1/models", timeout=2)
    assert greedy_text(replica.url, spec.model)


def _stop_removes_every_router(loop, launch, client, stop, monitor) -> None:
    actors = [r.actor for r in launch.routers.replicas]
    urls = launch.urls
    loop.loop.call_soon_threadsafe(stop.set)
    assert monitor.result(30) == "signal"
    loop.run(launch.stop())
    assert loop.run(list_routers(client, NAME)) == [] and loop.run(list_workers(client, NAME)) == []
    assert NAME not in loop.run(list_deployments(client))
    assert launch.routers.replicas == [] and launch.router is None
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.health.remote(), timeout=10)
    for url in urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/v1/models", timeout=2)
