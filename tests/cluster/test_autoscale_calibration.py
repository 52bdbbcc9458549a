"""The simulator calibrated against the real thing (issue 14): ``shoal bench calibrate``'s run, bounded.

A live deployment (``Launch`` on a local 2-node Ray cluster, an embedded etcd, the real SmolLM2 on
CPU) with one ``unified`` pool autoscaled by the ``slo`` policy between 1 and 3 replicas gets a load
step through its router; its replicas grow, and shrink back after the load, with no failed request.
The simulator, given the profile measured here before the run and the same requests, predicts the
live TTFT p90 within 30 %.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from ray_support import two_node_cluster  # first: it sets Ray's environment

from shoal.cluster.bench.calibrate import TOLERANCE, Calibration, calibrate, measure_profile, report  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timing: alone, after the parallel run

# Evenly spaced arrivals: at one or two a second, Poisson counts move the policy's rate by half from one
# second to the next, and a third replica (which two cores cannot run at the profile's speed) is then a
# matter of luck.
CAL = Calibration(base_rate=0.5, peak_rate=2.5, base_s=5.0, peak_s=20.0, settle_s=45.0, regular=True)


def test_a_load_step_scales_the_pool_and_the_simulator_predicts_its_ttft(tmp_path):
    profile = measure_profile(CAL.model, CAL.engine, None)
    path = tmp_path / "profile.json"
    profile.save(path)
    with two_node_cluster(num_cpus=2):
        payload = asyncio.run(calibrate(CAL, profile, str(path)))
    print(report(payload))
    (tmp_path / "calibrate.json").write_text(json.dumps(payload, default=str))
    figures = {r["figure"]: r for r in payload["results"]}
    assert figures["failed"]["live"] == 0, [r for r in payload["live_requests"] if r["error"]]
    assert figures["requests"]["live"] == figures["requests"]["simulated"] > 20
    assert figures["max_replicas"]["live"] >= 2, payload["live_samples"]
    assert payload["cold_starts_s"], "the replicas added were timed from decision to serving"
    assert payload["grown_at_s"] > payload["step_s"][0], "the pool grows once the step begins"
    assert payload["shrunk_at_s"] is not None and payload["shrunk_at_s"] > payload["step_s"][1], \
        "the pool shrinks back to its minimum after the load"
    assert abs(payload["ttft_p90_error"]) <= TOLERANCE, report(payload)
