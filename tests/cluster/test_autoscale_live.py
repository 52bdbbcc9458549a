"""The live reconcile loop without Ray: real policies and a real etcd, an injected observation source
(what the workers would report) and a recording scale target in place of the Ray controller (the
controller's own scaling is tested on a real Ray cluster in test_autoscale_ray.py)."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from shoal.cluster.autoscale import PoolObservation
from shoal.cluster.autoscale.live import Autoscaler, make_pool_policy
from shoal.cluster.autoscale.observe import LoadWindow
from shoal.cluster.autoscale.record import DecisionRecord, list_decisions
from shoal.cluster.launch import _status
from shoal.cluster.registry import connect, delete_deployment, put_spec
from shoal.cluster.spec import DeploymentSpec, SpecError
from shoal.router.metrics import RouterMetrics
from shoal.workers.protocol import WorkerLoad, WorkerTotals


def spec_with(autoscaling: dict, replicas: int = 1, name: str = "live") -> DeploymentSpec:
    return DeploymentSpec.from_dict({"name": name, "model": "/m", "pools": {"unified": {"replicas": replicas}},
                                     "autoscaling": autoscaling})


class Script:
    """Observations given by the test, one per tick, in order."""

    def __init__(self, *observations: dict) -> None:
        self.observations = list(observations)
        self.asked: list[tuple[str, float]] = []

    async def observe(self, pool: str, now: float) -> PoolObservation:
        self.asked.append((pool, now))
        return PoolObservation(now=now, pool=pool, **self.observations.pop(0))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def scale(self, role: str, n: int) -> int:
        self.calls.append((role, n))
        return n


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_loop_scales_on_the_policy_and_records_each_decision(etcd_server):
    spec = spec_with({"unified": {"min_replicas": 1, "max_replicas": 4, "policy": "queue", "target_waiting": 2,
                                  "scale_down_window_s": 10}})
    source = Script({"ready_replicas": 1, "num_waiting": 7, "num_running": 4},  # 7 waiting / 2 -> 4
                    {"ready_replicas": 2, "starting_replicas": 2, "num_waiting": 7},  # at 4 already: no call
                    {"ready_replicas": 4, "num_running": 1},  # idle, but inside the 10 s window: held
                    {"ready_replicas": 4, "num_running": 1})  # window over: down to 1
    target, clock = Recorder(), Clock()

    async def main():
        client = await connect(etcd_server.endpoint)
        try:
            await put_spec(client, spec)
            scaler = Autoscaler(spec, target, source, client=client, clock=clock, wall=lambda: 1.7e9)
            first = (await scaler.tick())["unified"]
            stored = (await list_decisions(client, spec.name))["unified"]
            clock.t += 1
            await scaler.tick()
            clock.t += 1
            held = (await scaler.tick())["unified"]
            clock.t += 20
            down = (await scaler.tick())["unified"]
            return first, stored, held, down, await list_decisions(client, spec.name)
        finally:
            await delete_deployment(client, spec.name)
            await client.close()

    first, stored, held, down, final = asyncio.run(main())
    assert target.calls == [("unified", 4), ("unified", 1)]
    assert (first.desired, first.current, first.ready, first.policy) == (4, 1, 1, "queue")
    assert first.reason.startswith("up") and first.inputs["num_waiting"] == 7 and first.time == 1.7e9
    assert stored == first  # what shoal status reads is what was decided
    assert (held.desired, held.current) == (4, 4) and "window" in held.reason
    assert (down.desired, down.current) == (1, 4) and final["unified"] == down
    assert [pool for pool, _ in source.asked] == ["unified"] * 4 and source.asked[-1][1] == 122.0


def test_status_shows_desired_and_current_per_pool(etcd_server, capsys):
    spec = spec_with({"unified": {"min_replicas": 1, "max_replicas": 3, "policy": "target",
                                  "metric": "num_running", "target": 2}})
    source, target = Script({"ready_replicas": 1, "num_running": 5}), Recorder()

    async def main():
        client = await connect(etcd_server.endpoint)
        try:
            await put_spec(client, spec)
            await Autoscaler(spec, target, source, client=client).tick()
            await _status(argparse.Namespace(etcd=etcd_server.endpoint, prefix="/shoal"))
        finally:
            await delete_deployment(client, spec.name)
            await client.close()

    asyncio.run(main())
    out = capsys.readouterr().out
    assert "live: model /m, 0/3 workers registered" in out  # the desired count, not the spec's replicas
    assert "autoscale unified: desired 3, current 1 (1 serving), target: up: num_running 5/replica" in out
    assert target.calls == [("unified", 3)]


def test_a_pool_without_autoscaling_is_never_observed_or_scaled():
    spec = DeploymentSpec.from_dict({"name": "fixed", "model": "/m", "pools": {
        "prefill": {"replicas": 2}, "decode": {"replicas": 1}},
        "autoscaling": {"decode": {"min_replicas": 1, "max_replicas": 2, "policy": "static", "replicas": 2}}})
    source, target = Script({"ready_replicas": 1}), Recorder()
    records = asyncio.run(Autoscaler(spec, target, source).tick())
    assert list(records) == ["decode"] and [p for p, _ in source.asked] == ["decode"]
    assert target.calls == [("decode", 2)]


def test_bad_autoscaling_config_is_a_clear_error():
    with pytest.raises(SpecError, match=r"autoscaling\.unified\.policy.*must be one of"):
        spec_with({"unified": {"max_replicas": 2, "policy": "hpa"}})
    with pytest.raises(SpecError, match=r"autoscaling\.unified\.target_waiting"):
        spec_with({"unified": {"max_replicas": 2, "policy": "queue", "target_waiting": -1}})
    with pytest.raises(SpecError, match=r"autoscaling\.unified\.max_replicas"):
        spec_with({"unified": {"policy": "queue"}})
    with pytest.raises(SpecError, match=r"pools\.unified\.replicas.*within autoscaling \[2, 3\]"):
        spec_with({"unified": {"min_replicas": 2, "max_replicas": 3}}, replicas=1)
    missing = spec_with({"unified": {"max_replicas": 2, "policy": "slo", "profile": "/no/such/profile.json"}})
    with pytest.raises(ValueError, match=r"autoscaling\.unified \(policy 'slo'\)"):
        make_pool_policy("unified", missing.autoscaling["unified"])
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Autoscaler(spec_with({}), Recorder(), Script(), interval_s=0)


def load(running: int, waiting: int = 0, kv: float = 0.0) -> WorkerLoad:
    return WorkerLoad(num_running=running, num_waiting=waiting, kv_usage=kv, num_free_blocks=0, num_total_blocks=64)


def test_the_load_window_derives_arrivals_and_mix_from_worker_counters():
    window = LoadWindow(window_s=10)
    window.add(0.0, {"w0": (load(2), WorkerTotals(10, 1000, 100, 1100))})
    first = window.observation("unified", 0.0, ready=1, starting=0)
    assert (first.arrival_rate, first.num_running, first.ready_replicas) == (0.0, 2, 1)  # no span yet
    # 4 s later: w0 finished 8 (prompts 50, outputs 10 each) and holds 3 more; w1 joined holding 1.
    window.add(4.0, {"w0": (load(3, 2, kv=0.5), WorkerTotals(18, 1400, 180, 1700, oldest_wait_s=2.5)),
                     "w1": (load(1, kv=0.1), WorkerTotals(0, 0, 0, 20, oldest_wait_s=0.5))})
    obs = window.observation("unified", 4.0, ready=2, starting=1)
    assert obs.arrival_rate == pytest.approx((8 + 3) / 4)  # finished + the change in requests present
    assert obs.recent_arrival_rate == pytest.approx((8 + 3) / 4)  # w1 joined: no interval of its own yet
    assert (obs.mean_prompt_len, obs.mean_output_len) == (50, 10)
    assert obs.tokens_per_s == pytest.approx(600 / 4)
    assert (obs.num_running, obs.num_waiting, obs.kv_usage) == (4, 2, pytest.approx(0.3))
    assert (obs.ready_replicas, obs.starting_replicas) == (2, 1)
    assert obs.max_queue_time_s == 2.5  # the queue policy's trigger: the longest wait of any worker
    # Old samples leave the window; the one at its start stays as the base.
    window.add(20.0, {"w0": (load(0), WorkerTotals(30, 2000, 300, 3000))})
    window.add(21.0, {"w0": (load(0), WorkerTotals(31, 2040, 310, 3050))})
    assert [t for t, _ in window.samples] == [4.0, 20.0, 21.0]
    late = window.observation("unified", 21.0, ready=1, starting=0)
    assert late.arrival_rate == pytest.approx((13 - 5) / 17)
    assert late.recent_arrival_rate == pytest.approx(1 / 1)  # the last second alone: one finished
    with pytest.raises(ValueError, match="window_s must be > 0"):
        LoadWindow(0)


def test_decision_records_round_trip():
    record = DecisionRecord("decode", 3, 2, 1, "slo", "up: planned", {"arrival_rate": 1.5}, 12.5)
    assert DecisionRecord.from_json(record.to_json()) == record


def test_router_metrics_export_the_latest_decisions_and_drop_gone_pools():
    metrics = RouterMetrics()
    metrics.observe_autoscale({"prefill": (3, 2), "decode": (1, 1)})
    text = metrics.render().decode()
    assert 'shoal_autoscale_desired_replicas{pool="prefill"} 3.0' in text
    assert 'shoal_autoscale_current_replicas{pool="prefill"} 2.0' in text
    assert 'shoal_autoscale_desired_replicas{pool="decode"} 1.0' in text
    metrics.observe_autoscale({"decode": (2, 1)})
    text = metrics.render().decode()
    assert 'pool="prefill"' not in text and 'shoal_autoscale_desired_replicas{pool="decode"} 2.0' in text


def test_a_pool_goes_to_zero_only_after_the_loop_watched_it_long_enough():
    spec = spec_with({"unified": {"min_replicas": 0, "max_replicas": 2, "policy": "queue",
                                  "scale_down_window_s": 0}})
    idle = {"ready_replicas": 1}
    source, target, clock = Script(idle, idle, idle, {"num_waiting": 1}), Recorder(), Clock()
    scaler = Autoscaler(spec, target, source, clock=clock, zero_after_s=30)

    def tick(dt: float) -> DecisionRecord:
        clock.t += dt
        return asyncio.run(scaler.tick())["unified"]

    first = tick(0)  # a fresh loop has no arrival history: a quiet moment is not yet idleness
    assert (first.desired, target.calls) == (1, []) and "not to zero before 30 s watched" in first.reason
    assert tick(10).desired == 1 and target.calls == []
    assert tick(25).desired == 0 and target.calls == [("unified", 0)]  # 35 s watched, still idle
    back = tick(1)  # at zero, a router's held request (demand) counts as waiting: one replica again
    assert (back.desired, back.current) == (1, 0) and target.calls[-1] == ("unified", 1)
    with pytest.raises(ValueError, match="zero_after_s must be >= 0"):
        Autoscaler(spec, target, source, zero_after_s=-1)


def test_requests_routers_hold_count_as_waiting_from_their_demand_keys(etcd_server):
    from shoal.cluster.autoscale.live import ControllerSource
    from shoal.cluster.registry import LeasedKey, demand_key, demand_value

    spec = spec_with({"unified": {"max_replicas": 4, "policy": "slo"}})

    class Pool:  # what ControllerSource reads of a Controller
        def __init__(self):
            self.spec = spec

        async def loads(self, pool):
            return {"w0": (load(2, waiting=1), WorkerTotals(0, 0, 0, 0))}

        def counts(self, pool):
            return 1, 0

    async def main():
        client = await connect(etcd_server.endpoint)
        try:
            source = ControllerSource(Pool(), client=client)
            assert (await source.observe("unified", 0.0)).num_waiting == 1  # the worker's own queue
            cold = await LeasedKey(client, demand_key("live", "router-0"), b'{"held": true}').start()
            full = await LeasedKey(client, demand_key("live", "router-1-full"), demand_value(5)).start()
            assert (await source.observe("unified", 1.0)).num_waiting == 1 + 1 + 5
            await full.update(demand_value(2))
            assert (await source.observe("unified", 2.0)).num_waiting == 1 + 1 + 2
            await cold.deregister()
            await full.deregister()
            assert (await source.observe("unified", 3.0)).num_waiting == 1
            assert (await source.observe("prefill", 4.0)).num_waiting == 1  # prefill pools never count them
        finally:
            await client.close()

    asyncio.run(main())


def test_a_router_reports_what_it_holds_for_a_worker_with_room(etcd_server):
    from shoal.cluster.etcd_router import EtcdRouter
    from shoal.cluster.registry import demand_prefix, held_requests

    spec = spec_with({"unified": {"max_replicas": 4, "policy": "slo"}})

    async def main():
        client = await connect(etcd_server.endpoint)
        router = EtcdRouter(spec, client, router_id="router-0")

        async def held():
            return {kv.key.decode().rsplit("/", 1)[1]: held_requests(kv.value)
                    for kv in await client.get_prefix(demand_prefix("live").encode())}

        try:
            await router._report_full(3)  # noqa: SLF001 - the follow loop's step, without a whole router
            assert await held() == {"router-0-full": 3}
            await router._report_full(1)  # noqa: SLF001
            assert await held() == {"router-0-full": 1}
            await router._report_full(0)  # noqa: SLF001
            assert await held() == {}
            await router._report_full(2)  # noqa: SLF001
            await router.stop()  # stopping takes the key with it
            assert await held() == {}
        finally:
            await client.close()

    asyncio.run(main())


def test_a_demand_key_stands_for_its_held_count_or_one():
    from shoal.cluster.registry import demand_value, held_requests

    assert held_requests(demand_value(7)) == 7
    assert held_requests(b'{"held": true}') == 1  # the scale-to-zero key: one router holding
    assert held_requests(b"not json") == held_requests(b'{"held": 0}') == held_requests(b"[]") == 1
