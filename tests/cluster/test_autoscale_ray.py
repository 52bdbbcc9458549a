"""Live scaling on a real 2-node Ray cluster, a real etcd, real workers and a real router.

``Controller.scale`` grows a pool by new replicas (new indices, in etcd membership, served by the
router), keeps a replica whose placement group cannot be placed "placing" while it asks the
autoscaler for room (``request_resources``, recorded here: no autoscaler runs on a local cluster),
and shrinks by graceful drain under load with no failed request. Then the reconcile loop does the same
from the workers' own load reports, and the router's /metrics exports its decisions. Last, the idle
pool goes to zero and a request brings a replica back: the router holds it and signals demand in etcd.
Each node has slots for the replicas (a rank asks for one), so the cluster holds exactly three: the
fourth cannot be placed.

Workers run a tiny random Llama with SmolLM2's vocabulary (the router tokenizes with SmolLM2's real
tokenizer, read from its GGUF).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from ray_support import LoopThread, two_node_cluster, wait_until  # first: it sets Ray's environment

import httpx  # noqa: E402
import ray  # noqa: E402

from shoal.cluster.autoscale.live import Autoscaler, ControllerSource  # noqa: E402
from shoal.cluster.autoscale.record import list_decisions  # noqa: E402
from shoal.cluster.controller import Controller  # noqa: E402
from shoal.cluster.etcd import EmbeddedEtcd  # noqa: E402
from shoal.cluster.etcd_router import EtcdRouter  # noqa: E402
from shoal.cluster.launch import Launch  # noqa: E402
from shoal.cluster.registry import connect, demand_prefix, list_workers  # noqa: E402
from shoal.cluster.spec import DeploymentSpec  # noqa: E402
from shoal.workers.models.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "scale-test"
TTL = 3


def spec_of(model_dir, tokenizer, etcd_endpoint: str) -> DeploymentSpec:
    return DeploymentSpec.from_dict({
        "name": NAME, "model": str(model_dir),
        "pools": {"unified": {"replicas": 1, "resources_per_rank": {"CPU": 0.5},
                              "engine": {"tokenizer": str(tokenizer), "load_format": "dummy", "device": "cpu",
                                         "dtype": "float32", "num_kv_blocks": 64, "max_model_len": 512,
                                         "max_num_batched_tokens": 512}}},
        "router": {"policy": "least_load"},
        "etcd": {"endpoints": etcd_endpoint},
        "autoscaling": {"unified": {"min_replicas": 0, "max_replicas": 2, "policy": "target",
                                    "metric": "num_running", "target": 1, "scale_down_window_s": 0}}})


class Asked:
    """Stands in for ``ray.autoscaler.sdk.request_resources`` (no autoscaler on a local cluster)."""

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []

    def __call__(self, bundles: list[dict]) -> None:
        self.calls.append(bundles)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, smollm2_path):
    """(loop, spec, controller, router url, router, etcd client, Asked) of a 1-replica deployment."""
    tiny = tmp_path_factory.mktemp("tiny")
    (tiny / "config.json").write_text(json.dumps(PRESETS["tiny-smollm2-vocab"]))
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data", unsafe_no_fsync=True).start()
    try:
        with two_node_cluster(slots=(2, 1)):
            yield from _deployment(tiny, smollm2_path, etcd)
    finally:
        etcd.stop()


def _deployment(tiny, tokenizer, etcd):
    loop = LoopThread()
    spec = spec_of(tiny, tokenizer, etcd.endpoint)
    client = loop.run(connect(etcd.endpoint))
    asked = Asked()
    controller = Controller(spec, client, etcd_endpoints=etcd.endpoint, lease_ttl_s=TTL,
                            extra_resources_per_rank={"slot": 1}, start_timeout_s=120, drain_grace_s=10,
                            place_wait_s=0.5, request_resources=asked)
    router = EtcdRouter(spec, client, host="127.0.0.1", port=0, health_interval_s=0.3)
    stop = asyncio.Event()
    loop.run(controller.start())
    port = loop.run(router.start())
    monitor = asyncio.run_coroutine_threadsafe(controller.run(stop, interval_s=0.3), loop.loop)
    try:
        yield loop, spec, controller, f"http://127.0.0.1:{port}", router, client, asked
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        monitor.result(30)
        loop.run(router.stop())
        loop.run(controller.stop())
        assert loop.run(list_workers(client, NAME)) == []
        loop.run(client.close())
        loop.close()


def scale(loop: LoopThread, controller: Controller, n: int) -> int:
    async def call():
        return controller.scale("unified", n)

    return loop.run(call())


def registered(loop: LoopThread, client) -> set[str]:
    return {w.worker_id for w in loop.run(list_workers(client, NAME))}


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def healthy(router: EtcdRouter) -> set[str]:
    return {s.worker_id for s in router.pool.states() if s.healthy}


class Load:
    """``threads`` clients sending completions back to back until the block ends; records statuses."""

    def __init__(self, url: str, model: str, threads: int = 4, max_tokens: int = 24) -> None:
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.statuses: list[int | str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                try:
                    resp = http.post(f"{self.url}/v1/completions", json={
                        "model": self.model, "prompt": "The capital of France is", "max_tokens": self.max_tokens,
                        "temperature": 0, "ignore_eos": True})
                    self.statuses.append(resp.status_code)
                    if resp.status_code != 200:
                        self.errors.append(resp.text)
                except httpx.HTTPError as e:
                    self.statuses.append(type(e).__name__)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def failed(self) -> list:
        return [s for s in self.statuses if s != 200]


def test_scale_up_adds_replicas_with_new_indices_that_register_and_serve(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    assert registered(loop, client) == {"unified-0-0"}
    assert scale(loop, controller, 3) == 3
    assert {d["replica"]: d["state"] for d in controller.describe()}["unified-2"] in ("placing", "starting")
    took = wait_until(lambda: registered(loop, client) == {"unified-0-0", "unified-1-0", "unified-2-0"}, 90,
                      "both new replicas register in etcd")
    wait_until(lambda: healthy(router) == registered(loop, client), 15, "the router places on all three")
    assert controller.counts("unified") == (3, 0)
    assert [d["state"] for d in controller.describe()] == ["serving"] * 3
    assert asked.calls == []  # there was room: nothing asked of the autoscaler
    print(f"2 replicas added in {took:.1f} s")


def test_a_replica_that_cannot_be_placed_stays_placing_and_asks_for_nodes(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    assert scale(loop, controller, 4) == 4  # three slots in the cluster, all taken
    wait_until(lambda: len(asked.calls) == 1, 10, "the controller asks the autoscaler for room")
    assert asked.calls[0] == [{"CPU": 0.5, "slot": 1}] * 4  # room for every replica of the deployment
    assert {d["replica"]: d["state"] for d in controller.describe()}["unified-3"] == "placing"
    assert controller.counts("unified") == (3, 1)
    assert loop.run(controller.check()) == []  # a group waiting for a node is not a dead replica
    pg = next(r.pg for r in controller.replicas if r.index == 3)
    assert scale(loop, controller, 3) == 3  # the newest, still placing, goes first (nothing to drain)
    wait_until(lambda: len(controller.replicas) == 3, 10, "the placing replica is removed")
    assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert asked.calls[-1] == [{"CPU": 0.5, "slot": 1}] * 3  # the standing request shrinks with the pool
    assert registered(loop, client) == {"unified-0-0", "unified-1-0", "unified-2-0"}


def test_scale_down_leaves_a_restarting_replica_for_a_later_call(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    top = next(r for r in controller.replicas if r.index == 2)
    ray.kill(top.actor, no_restart=True)
    loop.run(controller.check())  # this pass or the fixture's monitor (every 0.3 s) begins its restart
    wait_until(lambda: top.restarts == 1, 10, "its restart begins")
    assert scale(loop, controller, 2) == 3  # half restarted: not drained, and no serving one instead
    assert {d["replica"]: d["state"] for d in controller.describe()} == {
        "unified-0": "serving", "unified-1": "serving", "unified-2": "starting"}
    wait_until(lambda: "unified-2-1" in healthy(router), 60, "the restarted replica serves")
    assert controller.counts("unified") == (3, 0)
    assert top.restarts == 1  # two checks at once saw it dead: only one restarted it


def test_scale_down_drains_under_load_with_no_failed_request(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    victims = [r for r in controller.replicas if r.index in (1, 2)]
    pgs = [r.pg for r in victims]
    with Load(url, spec.model) as load:
        # Requests in flight on both replicas about to go: they must finish, not fail.
        wait_until(lambda: all(ray.get(r.actor.load.remote(), timeout=10)[0].num_running > 0 for r in victims),
                   30, "requests running on the replicas to be drained")
        started = time.monotonic()
        assert scale(loop, controller, 1) == 1
        assert {d["replica"]: d["state"] for d in controller.describe()} == {
            "unified-0": "serving", "unified-1": "draining", "unified-2": "draining"}
        wait_until(lambda: registered(loop, client) == {"unified-0-0"}, 10, "the drained replicas deregister")
        wait_until(lambda: len(controller.replicas) == 1, 30, "the drained replicas are removed")
        drained = time.monotonic() - started
        wait_until(lambda: len(load.statuses) > 20, 30, "more requests after the drain")
    assert load.statuses and load.failed() == [], f"{len(load.failed())} of {len(load.statuses)} failed: {load.errors}"
    assert all(ray.util.placement_group_table(pg)["state"] == "REMOVED" for pg in pgs)
    assert healthy(router) == {"unified-0-0"} and controller.counts("unified") == (1, 0)
    print(f"drained 2 replicas in {drained:.1f} s under load; {len(load.statuses)} requests, none failed")


def test_the_loop_scales_on_live_load_and_back(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    scaler = Autoscaler(spec, controller, ControllerSource(controller, window_s=10), client=client)
    with Load(url, spec.model, threads=3) as load:
        # target: 1 running request per replica, so three clients on one replica ask for the maximum, 2.
        wait_until(lambda: loop.run(scaler.tick())["unified"].desired == 2, 30, "the loop asks for 2")
        record = loop.run(list_decisions(client, NAME))["unified"]
        assert (record.current, record.policy) == (1, "target") and record.inputs["num_running"] > 1
        wait_until(lambda: 'shoal_autoscale_desired_replicas{pool="unified"} 2.0' in scrape(url), 10,
                   "the router exports the decision")
        assert 'shoal_autoscale_current_replicas{pool="unified"} 1.0' in scrape(url)
        wait_until(lambda: len(registered(loop, client)) == 2, 90, "the second replica registers")
        wait_until(lambda: healthy(router) == registered(loop, client), 15, "the router places on both")
    assert load.failed() == []
    # Idle now: no scale-down window, so the next ticks bring the pool back to its minimum.
    wait_until(lambda: loop.run(scaler.tick())["unified"].desired == 1, 30, "the loop asks for 1")
    wait_until(lambda: registered(loop, client) == {"unified-0-0"} and len(controller.replicas) == 1, 30,
               "the newest replica drains and goes")
    record = loop.run(list_decisions(client, NAME))["unified"]
    assert record.desired == 1 and record.reason.startswith("down")
    wait_until(lambda: 'shoal_autoscale_desired_replicas{pool="unified"} 1.0' in scrape(url), 10,
               "the router exports the decision down")


def test_an_idle_pool_scales_to_zero_and_a_held_request_brings_a_replica_back(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    scaler = Autoscaler(spec, controller, ControllerSource(controller, window_s=2, client=client), client=client,
                        zero_after_s=2)
    # No arrivals within the 2 s window (and no scale-down window): min_replicas 0 lets it go to zero.
    wait_until(lambda: loop.run(scaler.tick())["unified"].desired == 0, 30, "the loop asks for 0")
    wait_until(lambda: registered(loop, client) == set() and controller.replicas == [], 30, "the pool is empty")
    demand = lambda: list(loop.run(client.get_prefix(demand_prefix(NAME).encode(), keys_only=True)))  # noqa: E731
    assert demand() == [] and httpx.get(f"{url}/ready", timeout=10).json()["status"] == "cold"
    answer: dict = {}

    def ask() -> None:
        answer["resp"] = httpx.post(f"{url}/v1/completions", timeout=90, json={
            "model": spec.model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})

    held = threading.Thread(target=ask, daemon=True)
    sent = time.monotonic()
    held.start()
    wait_until(lambda: len(demand()) == 1, 10, "the router holds the request and puts its demand key")
    record = wait_until_record(loop, scaler, 1)
    assert record.current == 0 and record.inputs["num_waiting"] == 1
    held.join(90)
    cold_start = time.monotonic() - sent
    assert answer["resp"].status_code == 200, answer["resp"].text
    wait_until(lambda: demand() == [], 10, "the demand key goes once nothing is held")
    assert registered(loop, client) == {"unified-5-0"}  # indices are never reused (3 was placing, 4 drained)
    print(f"cold start from zero: {cold_start:.1f} s to the held request's answer")


def wait_until_record(loop: LoopThread, scaler: Autoscaler, desired: int):
    found = []
    wait_until(lambda: found.append(loop.run(scaler.tick())["unified"]) or found[-1].desired == desired, 10,
               f"the loop asks for {desired}")
    return found[-1]


def test_shoal_launch_runs_the_loop_for_an_autoscaled_pool(deployment):
    loop, spec, controller, url, router, client, asked = deployment
    data = spec.to_dict()
    data.update(name="launch-scale", autoscaling={"unified": {"min_replicas": 1, "max_replicas": 2,
                                                              "policy": "static", "replicas": 2}})
    data["pools"]["unified"]["replicas"] = 1
    other = DeploymentSpec.from_dict(data)
    launch = Launch(other, client, etcd_endpoints=",".join(other.etcd.endpoints), node_ip="127.0.0.1",
                    host="127.0.0.1", port=0, lease_ttl_s=TTL, start_timeout_s=120, health_interval_s=0.3,
                    autoscale_interval_s=0.3, autoscale_window_s=5)
    stop = asyncio.Event()
    running = None
    try:
        loop.run(launch.start())
        running = asyncio.run_coroutine_threadsafe(launch.run(stop, interval_s=0.3), loop.loop)
        ids = lambda: {w.worker_id for w in loop.run(list_workers(client, "launch-scale"))}  # noqa: E731
        wait_until(lambda: ids() == {"unified-0-0", "unified-1-0"}, 90, "the launcher's loop adds the replica")
        record = loop.run(list_decisions(client, "launch-scale"))["unified"]
        assert (record.desired, record.policy) == (2, "static")
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        if running is not None:
            running.result(30)
        loop.run(launch.stop())
    assert loop.run(list_workers(client, "launch-scale")) == []
