"""The Ray controller on a real 2-node ``ray.cluster_utils.Cluster``, a real etcd and real workers.

Dead replicas (``ray.kill``) and wedged ones (an event loop blocked by ``WorkerActor.wedge_for_test``)
are both replaced by new ones with new worker ids; a pool's ``kv_transfer`` reaches its engines.

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

from shoal.cluster.controller import Controller, Replica, bundle_of, control_key  # noqa: E402
from shoal.cluster.etcd import EmbeddedEtcd  # noqa: E402
from shoal.cluster.launch import EtcdRouter  # noqa: E402
from shoal.cluster.ray_worker import WorkerActor  # noqa: E402
from shoal.cluster.registry import connect, get_spec, list_workers  # noqa: E402
from shoal.cluster.spec import DeploymentSpec  # noqa: E402
from shoal.workers.models.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.slow

TTL = 3
HANG = 2.0  # the hang test's hang_timeout_s
NAME = "ray-test"
KV_TRANSFER = {"export_ttl_s": 12.5, "layers_per_chunk": 2}  # non-defaults: they must reach the engines
TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]  # 2 layers, SmolLM2's vocabulary


def tiny_spec(model_dir, tokenizer, etcd_endpoint: str, replicas: int = 2, name: str = NAME) -> DeploymentSpec:
    return DeploymentSpec.from_dict({
        "name": name, "model": str(model_dir),
        "pools": {"unified": {"replicas": replicas, "resources_per_rank": {"CPU": 1},
                              "engine": {"tokenizer": str(tokenizer), "load_format": "dummy", "device": "cpu",
                                         "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 512,
                                         "max_num_batched_tokens": 512},
                              "kv_transfer": KV_TRANSFER}},
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
    # A pool's own custom resources (the chart's shoal_pool_<role>) count per rank too.
    pinned = DeploymentSpec.from_dict({"name": "x", "model": str(tiny_dir), "pools": {"unified": {
        "tensor_parallel_size": 2, "resources_per_rank": {"CPU": 1, "custom": {"shoal_pool_unified": 1}}}}})
    assert bundle_of(pinned.pools["unified"]) == {"CPU": 2, "shoal_pool_unified": 2}
    assert DeploymentSpec.from_dict(pinned.to_dict()) == pinned


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
        disagg = ray.get(replica.actor.disagg_config.remote(), timeout=10)  # the pool's kv_transfer
        assert disagg["export_ttl_s"] == 12.5 and disagg["layers_per_chunk"] == 2 and disagg["max_links"] == 64
    wait_until(lambda: healthy_ids(router) == {"unified-0-0", "unified-1-0"}, 15, "router discovers both")
    for _ in range(4):  # least_load spreads these over both workers; every one must succeed
        resp = complete(url, spec.model)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4


class RequestsMeanwhile:
    """Completions one after another on a thread until the block ends: each must end (none hangs)."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.results: list[tuple[int | str, float]] = []  # (status or exception name, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status = complete(self.url, self.model, timeout=20).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            self.results.append((status, time.monotonic() - t0))

    def __enter__(self) -> "RequestsMeanwhile":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def summary(self) -> str:
        return (f"{len(self.results)} requests meanwhile, statuses {sorted({str(s) for s, _ in self.results})}, "
                f"slowest {max(e for _, e in self.results):.2f} s")

    def assert_none_hung(self) -> None:
        """Some ran; each ended within its timeout with a 200 or a server error, never hanging."""
        assert self.results and all(elapsed < 20 for _, elapsed in self.results)
        assert all(s == 200 or (isinstance(s, int) and s >= 500) for s, _ in self.results), self.summary()


def test_killed_replica_drops_out_and_comes_back(deployment):
    loop, spec, controller, url, router, client = deployment
    replica = controller.replicas[0]
    old_id, old_actor = replica.worker_id, replica.actor
    with RequestsMeanwhile(url, spec.model) as meanwhile:  # while the replica dies and returns
        killed = time.monotonic()
        ray.kill(old_actor, no_restart=True)
        ids = lambda: {w.worker_id for w in loop.run(list_workers(client, NAME))}  # noqa: E731
        gone = wait_until(lambda: old_id not in ids(), TTL + 2, "the dead worker's key goes")
        wait_until(lambda: old_id not in router.pool, 5, "the router drops the dead worker")
        new_id = replica.worker_id
        assert new_id == old_id[:-1] + "1" and replica.restarts == 1
        wait_until(lambda: new_id in healthy_ids(router), 90, "the restarted worker serves again")
    print(f"key gone after {gone:.1f} s, replica back after {time.monotonic() - killed:.1f} s; "
          f"{meanwhile.summary()}")
    meanwhile.assert_none_hung()
    assert ids() == {new_id, "unified-1-0"}
    assert complete(url, spec.model).status_code == 200


def test_hang_timeout_must_be_positive(tiny_dir):
    spec = tiny_spec(tiny_dir, tiny_dir, "127.0.0.1:2379")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^hang_timeout_s must be > 0 \(seconds .*\), got"):
            Controller(spec, None, etcd_endpoints="127.0.0.1:2379", hang_timeout_s=bad)


def test_wedged_replica_is_killed_and_restarted(deployment):
    """A replica alive but silent (its event loop blocked: health, gRPC and the lease keep-alive all
    stop) is judged hung after hang_timeout_s: its key goes, it is killed, and a new actor with a
    new worker id registers and serves; requests meanwhile go to the other replica and succeed."""
    loop, spec, controller, url, router, client = deployment
    ids = lambda: {w.worker_id for w in loop.run(list_workers(client, NAME))}  # noqa: E731
    wait_until(lambda: all(r.endpoint for r in controller.replicas)
               and healthy_ids(router) == {r.worker_id for r in controller.replicas}, 90, "both replicas serve")
    replica = controller.replicas[1]
    old_id, old_actor, hangs, restarts = replica.worker_id, replica.actor, replica.hangs, replica.restarts
    new_id = f"{replica.role}-{replica.index}-{replica.generation + 1}"
    controller.hang_timeout_s = HANG  # small for this test only: a busy CI machine may pause others
    try:
        # Requests from before the wedge on: one in flight on the wedged worker ends (with an error,
        # or retried elsewhere) once the router drops the worker, instead of waiting for its deadline.
        with RequestsMeanwhile(url, spec.model) as meanwhile:
            time.sleep(0.5)
            wedged = time.monotonic()
            old_actor.wedge_for_test.remote(300)  # never returns on its own within the test
            judged = wait_until(lambda: replica.hangs == hangs + 1, HANG + 10, "the controller judges it hung")
            assert replica.restarts == restarts + 1 and replica.worker_id == new_id
            wait_until(lambda: old_id not in ids() and old_id not in router.pool, 5,
                       "the wedged worker's key goes and the router drops it")
            with pytest.raises(ray.exceptions.RayActorError):  # killed, not left wedged
                ray.get(old_actor.health.remote(), timeout=30)
            wait_until(lambda: new_id in ids(), 90, "the new worker registers")
            wait_until(lambda: new_id in healthy_ids(router), 30, "the router uses the new worker")
    finally:
        controller.hang_timeout_s = 60.0
    print(f"judged hung {judged:.1f} s after the wedge (timeout {HANG} s), back after "
          f"{time.monotonic() - wedged:.1f} s; {meanwhile.summary()}")
    meanwhile.assert_none_hung()
    assert {"replica": "unified-1", "worker_id": new_id, "endpoint": replica.endpoint, "restarts": restarts + 1,
            "state": "serving", "hangs": hangs + 1} in controller.describe()
    for _ in range(4):  # least_load spreads these over both replicas again
        assert complete(url, spec.model).status_code == 200


def test_a_replica_still_starting_is_not_judged_hung(deployment):
    """The same silence from a replica whose start() has not returned (no endpoint yet: loading its
    model) is not a hang: start_timeout_s judges that."""
    loop, spec, controller, url, router, client = deployment
    etcd = spec.etcd.endpoints[0]
    other = Controller(tiny_spec("/nonexistent", "/nonexistent", etcd, name="starting"), client,
                       etcd_endpoints=etcd, hang_timeout_s=0.3)
    actor = ray.remote(WorkerActor).options(num_cpus=0, max_restarts=0).remote(
        "starting", "unified", "unified-0-0", "/nonexistent", {}, etcd)
    try:
        assert ray.get(actor.health.remote(), timeout=30)["endpoint"] is None  # created, never started
        actor.wedge_for_test.remote(60)
        replica = Replica("unified", 0, pg=None, actor=actor)
        other.replicas.append(replica)
        for _ in range(3):  # each ping times out after 0.3 s: silent for longer than hang_timeout_s
            assert loop.run(other.check(ping_timeout_s=0.3)) == []
        assert (replica.generation, replica.restarts, replica.hangs, replica.restarting) == (0, 0, 0, None)
    finally:
        ray.kill(actor, no_restart=True)


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
