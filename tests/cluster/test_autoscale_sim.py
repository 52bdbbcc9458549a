"""The autoscaling simulator on a hand-made profile: every request is served, the figures add up, and the
policies order as their design says (static peak attains the most, static mean the fewest replica-hours)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.cluster.autoscale import Profile
from shoal.cluster.autoscale.sim.experiment import POLICIES, Experiment, run_grid

# A worker whose prefill costs 1 ms a token and whose decode step grows with the batch: ~40 req/s of
# 256-in / 32-out at most, and much less inside a 50 ms ITL.
PROFILE = Profile(model="hand-made", device="test", prefill_lens=(64, 256, 1024), prefill_s=(0.064, 0.256, 1.024),
                  decode_batches=(1, 8, 32), decode_contexts=(256, 2048),
                  decode_step_s=((0.010, 0.012), (0.020, 0.026), (0.060, 0.080)),
                  cold_start_s=5.0, max_num_seqs=32, max_num_batched_tokens=2048, kv_capacity_tokens=65536)


@pytest.fixture(scope="module")
def grid():
    exp = Experiment(PROFILE, ttft_s=1.0, itl_s=0.05, peak_replicas=3, duration_s=240, input_len=256, output_len=32)
    runs, rows = run_grid(exp, traces=["steady", "spike"])
    return exp, runs, {(r["trace"], r["policy"]): r for r in rows}


def test_every_policy_serves_every_request_of_each_trace(grid):
    exp, runs, rows = grid
    for trace_name, (trace, results) in runs.items():
        assert set(results) == set(POLICIES)
        for policy, result in results.items():
            assert len(result.requests) == len(trace.requests) > 50, (trace_name, policy)
            assert all(r.ttft() is not None for r in result.requests), (trace_name, policy)
            row = rows[(trace_name, policy)]
            assert 0 <= row["slo_attainment"] <= 1
            assert row["ttft_p50"] <= row["ttft_p90"] <= row["ttft_p99"]


def test_static_baselines_hold_their_size_for_the_whole_trace(grid):
    exp, runs, rows = grid
    trace, _ = runs["steady"]
    peak = exp.replicas_for(trace.peak_rate)
    assert rows[("steady", "static_peak")]["replica_hours"] == pytest.approx(peak * 240 / 3600)
    assert rows[("steady", "static_peak")]["scale_events"] == 0
    assert rows[("steady", "static_mean")]["replica_hours"] <= rows[("steady", "static_peak")]["replica_hours"]


def test_more_replicas_keep_more_requests_inside_the_slo_on_a_spike(grid):
    _, _, rows = grid
    assert rows[("spike", "static_peak")]["slo_attainment"] >= rows[("spike", "static_mean")]["slo_attainment"]
    assert rows[("spike", "static_peak")]["slo_attainment"] > 0.9
    assert rows[("spike", "slo")]["scale_events"] > 0  # it reacts to the spike


def test_the_bench_writes_one_row_per_trace_and_policy(tmp_path):
    profile = tmp_path / "p.json"
    PROFILE.save(profile)
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "bench", "autoscale", "--profile", str(profile),
                          "--trace", "bursty", "--duration", "120", "--peak-replicas", "2", "--ttft-slo", "1",
                          "--itl-slo", "0.05", "--input-len", "256", "--output-len", "32",
                          "--result-file", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["trace"], r["policy"]) for r in rows] == [("bursty", p) for p in POLICIES]
    assert "slo_attainment" in res.stdout


def test_a_profile_that_cannot_meet_the_slo_is_one_clear_error(tmp_path):
    profile = tmp_path / "p.json"
    PROFILE.save(profile)
    res = subprocess.run([sys.executable, "-m", "shoal.cluster.cli", "bench", "autoscale", "--profile", str(profile),
                          "--trace", "steady", "--ttft-slo", "0.01"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("shoal: error: profile 'hand-made'") and "serves no rate" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_trace_mean_rate_counts_only_what_falls_inside_the_trace():
    from shoal.cluster.autoscale.sim.traces import make_trace

    short = make_trace("spike", 10.0, duration_s=240)  # the spike (300 s) runs past the end
    assert short.mean_rate == pytest.approx((80 * 1.0 + 160 * 10.0) / 240)
    assert short.mean_rate <= short.peak_rate
    long = make_trace("spike", 10.0, duration_s=1200)
    assert long.mean_rate == pytest.approx((900 * 1.0 + 300 * 10.0) / 1200)


def test_the_router_holds_what_no_replica_has_room_for_and_serves_it_later():
    from shoal.cluster.autoscale import Decision
    from shoal.cluster.autoscale.sim.simulator import SimConfig, Simulator
    from shoal.cluster.autoscale.sim.traces import make_trace

    class Watch:  # a static policy that keeps what it saw
        name = "watch"

        def __init__(self):
            self.seen = []

        def decide(self, obs):
            self.seen.append(obs)
            return Decision(2, "fixed")

    trace = make_trace("steady", 30.0, duration_s=30, input_len=256, output_len=32)  # far above 2 replicas
    runs = {}
    for cap in (0, 3):
        watch = Watch()
        result = Simulator(trace, PROFILE, {"unified": watch}, {"unified": 2},
                           SimConfig(max_open_per_worker=cap)).run()
        assert all(r.done for r in result.requests)  # held, never dropped
        runs[cap] = (watch.seen, result)
    held_seen, held = runs[3]
    assert max(o.num_running for o in held_seen) <= 2 * 3  # no replica took more than the limit
    assert max(o.num_waiting for o in held_seen) > 0  # the rest waited at the router
    free_seen, free = runs[0]
    assert max(o.num_running for o in free_seen) > 2 * 3
    worst_itl = lambda res: max(r.itl() for r in res.requests)  # noqa: E731
    assert worst_itl(held) < worst_itl(free)  # small batches: every running request decodes faster
