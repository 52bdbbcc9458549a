"""The Ray controller on a real 2-node ``ray.cluster_utils.Cluster``, a real etcd and real workers.

Workers run a tiny random Llama with SmolLM2's vocabulary (the router tokenizes with SmolLM2's real
tokenizer, read from its GGUF). Each node has one ``slot`` resource and every rank asks for one, so a
2-replica pool must spread one replica per node. The controller and router live on one asyncio loop
in a background thread for the whole module (the fixtures are expensive: ~20 s for Ray and 2 engines).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from ray_support import LoopThread, two_node_cluster, wait_until

import httpx  # noqa: E402
import ray  # noqa: E402

from shoal.cluster.controller import Controller, bundle_of, control_key  # noqa: E402
from shoal.cluster.etcd import EmbeddedEtcd  # noqa: E402
from shoal.cluster.launch import EtcdRouter  # noqa: E402
from shoal.cluster.ray_worker import WorkerActor  # noqa: E402
from shoal.cluster.registry import connect, get_spec, list_workers  # noqa: E402
from shoal.cluster.spec import DeploymentSpec  # noqa: E402
from shoal.workers.models.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.slow

TTL = 3
NAME = "ray-test"
TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]  # 2 layers, SmolLM2's vocabulary


def tiny_spec(model_dir, tokenizer, etcd_endpoint: str, replicas: int = 2, name: str = NAME) -> DeploymentSpec:
    return DeploymentSpec.from_dict({
        "name": name, "model": str(model_dir),
        "pools": {"unified": {"replicas": replicas, "resources_per_rank": {"CPU": 1},
                              "engine": {"tokenizer": str(tokenizer), "load_format": "dummy", "device": "cpu",
                                         "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 512,
                                         "max_num_batched_tokens": 512}}},
        "router": {"policy": "least_load", "port": 8000},
        "etcd": {"endpoints": etcd_endpoint}})


@pytest.fixture(scope="module")
def ray_cluster():
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data", unsafe_no_fsync=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-smol-vocab")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def deployment(ray_cluster, etcd, tiny_dir, smollm2_path):
    """(loop, spec, controller, router url, router, etcd client) of a running 2-replica deployment."""
    loop = LoopThread()
    spec = tiny_spec(tiny_dir, smollm2_path, etcd.endpoint)
    client = loop.run(connect(etcd.endpoint))
    controller = Controller(spec, client, etcd_endpoints=etcd.endpoint, lease_ttl_s=TTL,
                            extra_resources_per_rank={"slot": 1}, start_timeout_s=120)
    router = EtcdRouter(spec, client, host="127.0.0.1", port=0, health_interval_s=0.3)
    stop = asyncio.Event()
    started = time.monotonic()
    loop.run(controller.start())
    port = loop.run(router.start())
    print(f"deployment up in {time.monotonic() - started:.1f} s")
    monitor = asyncio.run_coroutine_threadsafe(controller.run(stop, interval_s=0.3), loop.loop)
    try:
        yield loop, spec, controller, f"http://127.0.0.1:{port}", router, client
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        monitor.result(30)
        loop.run(router.stop())
        loop.run(controller.stop())
        assert loop.run(list_workers(client, NAME)) == []
        loop.run(client.close())
        loop.close()


def complete(url: str, model: str, timeout: float = 15.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=timeout,
                      json={"model": model, "prompt": "The capital of France is", "max_tokens": 4,
                            "temperature": 0})


def healthy_ids(router: EtcdRouter) -> set[str]:
    return {s.worker_id for s in router.pool.states() if s.healthy}


def test_bundle_refuses_an_empty_reservation(tiny_dir):
    spec = DeploymentSpec.from_dict({"name": "x", "model": str(tiny_dir),
                                     "pools": {"unified": {"resources_per_rank": {"CPU": 0}}}})
    with pytest.raises(ValueError, match="resources_per_rank must reserve something"):
        bundle_of(spec.pools["unified"])
    assert bundle_of(spec.pools["unified"], {"slot": 1}) == {"slot": 1}
    # A TP replica is one bundle holding every rank's share: its rank-0 actor sees all of its GPUs.
    tp = DeploymentSpec.from_dict({"name": "x", "model": str(tiny_dir), "pools": {"unified": {
        "tensor_parallel_size": 4, "resources_per_rank": {"CPU": 2, "GPU": 1, "memory": "1Gi"}}}})
    assert bundle_of(tp.pools["unified"], {"slot": 1}) == {"CPU": 8, "GPU": 4, "memory": 4 * 2**30, "slot": 4}


def test_replicas_spread_register_and_serve(deployment):
    loop, spec, controller, url, router, client = deployment
    assert loop.run(get_spec(client, NAME)) == spec
    workers = loop.run(list_workers(client, NAME))
    assert [w.worker_id for w in workers] == ["unified-0-0", "unified-1-0"]
    nodes = {w.meta["node_id"] for w in workers}
    assert len(nodes) == 2  # one replica per node: each node has one "slot"
    assert nodes <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for replica in controller.replicas:  # the replica's placement group holds its actor
        table = ray.util.placement_group_table(replica.pg)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert table["bundles"] == {0: {"CPU": 1.0, "slot": 1.0}}
    wait_until(lambda: healthy_ids(router) == {"unified-0-0", "unified-1-0"}, 15, "router discovers both")
    for _ in range(4):  # least_load spreads these over both workers; every one must succeed
        resp = complete(url, spec.model)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4


def test_killed_replica_drops_out_and_comes_back(deployment):
    loop, spec, controller, url, router, client = deployment
    replica = controller.replicas[0]
    old_id, old_actor = replica.worker_id, replica.actor
    results: list[tuple[int | str, float]] = []
    stop_clients = threading.Event()

    def client_loop():  # requests while the replica dies and returns: each ends, none hangs
        while not stop_clients.is_set():
            t0 = time.monotonic()
            try:
                status = complete(url, spec.model, timeout=20).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            results.append((status, time.monotonic() - t0))

    clients = threading.Thread(target=client_loop, daemon=True)
    clients.start()
    killed = time.monotonic()
    ray.kill(old_actor, no_restart=True)
    ids = lambda: {w.worker_id for w in loop.run(list_workers(client, NAME))}  # noqa: E731
    gone = wait_until(lambda: old_id not in ids(), TTL + 2, "the dead worker's key goes")
    wait_until(lambda: old_id not in router.pool, 5, "the router drops the dead worker")
    new_id = replica.worker_id
    assert new_id == old_id[:-1] + "1" and replica.restarts == 1
    back = wait_until(lambda: new_id in healthy_ids(router), 90, "the restarted worker serves again")
    stop_clients.set()
    clients.join(30)
    codes = sorted({str(status) for status, _ in results})
    print(f"key gone after {gone:.1f} s, replica back after {time.monotonic() - killed:.1f} s; "
          f"{len(results)} requests meanwhile, statuses {codes}, slowest {max(e for _, e in results):.2f} s")
    assert results and all(elapsed < 20 for _, elapsed in results)
    assert all(status == 200 or (isinstance(status, int) and status >= 500) for status, _ in results)
    assert ids() == {new_id, "unified-1-0"}
    assert complete(url, spec.model).status_code == 200


def test_stop_key_ends_the_monitor(deployment):
    """``shoal stop`` writes the control key; ``Controller.run`` returns "control" on it."""
    loop, spec, controller, url, router, client = deployment
    other = Controller(tiny_spec("/nonexistent", "/nonexistent", spec.etcd.endpoints[0], name="other"),
                       client, etcd_endpoints=spec.etcd.endpoints[0])
    loop.run(client.put(control_key("other").encode(), b"stop"))
    try:
        assert loop.run(other.run(asyncio.Event(), interval_s=0.1), timeout=10) == "control"
    finally:
        loop.run(client.delete(control_key("other").encode()))


def test_worker_actor_drains_and_its_lease_expires(deployment):
    """Without the controller: drain deletes the key at once; a killed actor's key lives out its TTL."""
    loop, spec, controller, url, router, client = deployment
    actor_cls = ray.remote(WorkerActor).options(num_cpus=1, max_restarts=0)
    ids = lambda: [w.worker_id for w in loop.run(list_workers(client, "solo"))]  # noqa: E731

    def start(worker_id: str):
        actor = actor_cls.remote("solo", "unified", worker_id, spec.model, dict(spec.pools["unified"].engine),
                                 spec.etcd.endpoints[0], lease_ttl_s=TTL, host="127.0.0.1")
        endpoint = ray.get(actor.start.remote(), timeout=90)
        assert endpoint.startswith("127.0.0.1:") and ids() == [worker_id]
        assert ray.get(actor.health.remote())["serving"]
        return actor

    drained = start("solo-a")
    ray.get(drained.drain.remote(1.0), timeout=30)
    assert ids() == []  # deregistered at once, not at the TTL
    health = ray.get(drained.health.remote())
    assert not health["serving"] and health["endpoint"] is None
    ray.kill(drained)

    killed = start("solo-b")
    ray.kill(killed, no_restart=True)  # nobody revokes its lease: etcd expires it
    took = wait_until(lambda: ids() == [], TTL + 2, "the killed actor's key expires", interval=0.05)
    assert took > 0.5, f"key went after {took:.2f} s: too soon for a lease expiry"
