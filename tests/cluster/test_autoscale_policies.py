"""The autoscaling policies as pure objects: observation in, desired replicas out (no Ray, no clock)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from shoal.cluster.autoscale import (Bounds, PoolObservation, available_policies, check_policy_options,
                                     make_policy, policy_options)
from shoal.cluster.autoscale.behavior import BehaviorConfig, Stabilizer
from shoal.workers.options import OptionError


def obs(now: float, ready: int, **kw) -> PoolObservation:
    return PoolObservation(now=now, ready_replicas=ready, **kw)


def test_the_registry_names_every_policy_and_refuses_an_unknown_one():
    assert {"static", "target", "queue", "slo"} <= set(available_policies())
    with pytest.raises(ValueError, match=r"unknown autoscaling policy 'hpa'.*choose one of"):
        make_policy("hpa", Bounds(1, 4))


def test_bad_options_are_refused_by_name_and_limit():
    with pytest.raises(OptionError, match=r"autoscaling\.unified\.target"):
        check_policy_options("target", {"metric": "kv_usage", "target": 1.5}, "autoscaling.unified")
    with pytest.raises(OptionError, match="tolerance"):
        check_policy_options("target", {"tolerance": 2}, "autoscaling.unified")
    with pytest.raises(OptionError, match="no_such_knob"):
        check_policy_options("queue", {"no_such_knob": 1}, "autoscaling.decode")
    assert check_policy_options("queue", {"target_waiting": 2}) == {"target_waiting": 2}


def test_bounds_clamp_and_refuse_an_empty_range():
    b = Bounds(1, 3)
    assert [b.clamp(n) for n in (0, 2, 9)] == [1, 2, 3]
    assert Bounds(0, 2).clamp(0) == 0
    for lo, hi in ((2, 1), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="replica bounds"):
            Bounds(lo, hi)


def test_static_holds_its_count_within_the_bounds():
    assert make_policy("static", Bounds(1, 4)).decide(obs(0, 1, num_waiting=50)).replicas == 4
    assert make_policy("static", Bounds(1, 4), replicas=2).decide(obs(0, 4)).replicas == 2
    assert make_policy("static", Bounds(1, 4), replicas=9).decide(obs(0, 4)).replicas == 4


def test_target_tracks_its_metric_per_replica_with_a_tolerance():
    p = make_policy("target", Bounds(1, 8), metric="num_running", target=4, scale_down_window_s=0)
    assert p.decide(obs(0, 2, num_running=16)).replicas == 4  # 8 per replica vs 4: double
    assert p.decide(obs(1, 4, num_running=17)).replicas == 4  # 4.25: inside the 10 % tolerance
    assert p.decide(obs(2, 4, num_running=4)).replicas == 1  # 1 per replica: shrink
    assert p.decide(obs(3, 4, num_running=400)).replicas == 8  # the bound


def test_target_activates_a_pool_at_zero_and_never_empties_one_with_work():
    p = make_policy("target", Bounds(0, 4), metric="kv_usage", target=0.8, scale_down_window_s=0)
    assert p.decide(obs(0, 0)).replicas == 0
    assert p.decide(obs(1, 0, num_waiting=1)).replicas == 1
    assert p.decide(obs(2, 2, kv_usage=0.0, num_running=1)).replicas == 1
    assert p.decide(obs(3, 1, kv_usage=0.0)).replicas == 0


def test_queue_scales_on_waiting_requests_and_on_time_in_queue():
    p = make_policy("queue", Bounds(1, 10), target_waiting=4, max_queue_time_s=5, scale_down_window_s=0)
    assert p.decide(obs(0, 1, num_waiting=10)).replicas == 3
    d = p.decide(obs(1, 3, num_waiting=1, max_queue_time_s=6))
    assert d.replicas == 4 and "oldest waited 6.0s" in d.reason
    assert p.decide(obs(2, 4, num_running=3)).replicas == 1
    assert d.inputs["num_waiting"] == 1


def test_the_stabilizer_holds_scale_down_for_its_window_and_limits_steps():
    s = Stabilizer(BehaviorConfig(scale_down_window_s=10, max_step_up=2, max_step_down=1))
    assert s.apply(0, 1, 6) == (3, "up (limited to 2 a step)")
    assert s.apply(1, 3, 6)[0] == 5
    assert s.apply(2, 5, 6)[0] == 6
    desired, why = s.apply(5, 6, 2)
    assert desired == 6 and "scale-down window" in why  # 6 was recommended 3 s ago
    assert s.apply(13, 6, 2)[0] == 5  # window passed: down, one step
    assert s.apply(14, 5, 2)[0] == 4


def test_the_stabilizer_scale_up_window_takes_the_lowest_recent_recommendation():
    s = Stabilizer(BehaviorConfig(scale_up_window_s=5, scale_down_window_s=0))
    assert s.apply(0, 1, 1)[0] == 1
    assert s.apply(1, 1, 4)[0] == 1  # a spike inside the window does not move the pool yet
    assert s.apply(7, 1, 4)[0] == 4


def test_every_decision_stays_within_the_bounds_and_says_why():
    for name in ("static", "target", "queue"):
        p = make_policy(name, Bounds(2, 5))
        for t, (ready, waiting, running) in enumerate([(2, 0, 0), (2, 100, 50), (5, 0, 0), (3, 7, 1)]):
            d = p.decide(obs(float(t * 400), ready, num_waiting=waiting, num_running=running,
                             kv_usage=min(1.0, running / 10)))
            assert 2 <= d.replicas <= 5 and d.reason, (name, t, d)


def test_every_policy_option_is_documented_with_its_default():
    """docs/autoscaling.md has a row `| `name` | default |` for every option of every policy."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "autoscaling.md").read_text()
    for name in available_policies():
        for o in policy_options(name):
            rows = [line for line in doc.splitlines() if line.startswith(f"| `{o.name}` |")]
            assert rows, f"docs/autoscaling.md: no row for {name}.{o.name}"
            shown = "true" if o.default is True else "false" if o.default is False else f"{o.default:g}" \
                if isinstance(o.default, float) else str(o.default)
            assert any(shown in row or o.default is None for row in rows), (name, o.name, shown, rows)


# -- slo: the arrival-rate estimate -------------------------------------------------------------------

def slo_policy(**options):
    from shoal.cluster.autoscale import Profile
    from tests.cluster.test_autoscale_sim import PROFILE

    assert isinstance(PROFILE, Profile)
    return make_policy("slo", Bounds(0, 100), PROFILE, ttft_s=1.0, itl_s=0.05, default_prompt_len=256,
                       default_output_len=32, **options)


def feed(policy, counts, start: float = 0.0, interval: float = 5.0, replicas: int = 1):
    """Observations every ``interval`` s with ``counts[i]`` arrivals in interval i -> the decisions."""
    out = []
    for i, n in enumerate(counts):
        rate = n / interval
        out.append(policy.decide(obs(start + (i + 1) * interval, replicas, arrival_rate=rate,
                                     recent_arrival_rate=rate, mean_prompt_len=256, mean_output_len=32)))
        replicas = out[-1].replicas
    return out


def test_slo_plans_on_the_long_mean_so_poisson_noise_does_not_inflate_a_steady_load():
    import random

    rng = random.Random(0)
    steady = [sum(1 for _ in range(2000) if rng.random() < 40 / 2000) for _ in range(120)]  # 8 req/s, Poisson-ish
    decisions = feed(slo_policy(), steady)
    per_replica = decisions[-1].inputs["rate_per_replica"]
    need = math.ceil(8.0 / per_replica)
    assert not any("shifted" in d.reason for d in decisions[24:])  # noise is never a shift
    assert max(d.replicas for d in decisions[24:]) <= need  # planning on each 5 s sample: need + 1 here


def test_slo_answers_a_step_in_load_at_the_tick_that_sees_it_and_forgets_the_old_level():
    policy = slo_policy()
    before = feed(policy, [2] * 24)  # 0.4 req/s for 2 minutes
    after = feed(policy, [20] * 6, start=120.0, replicas=before[-1].replicas)  # then 4 req/s
    assert "load shifted up" in after[0].reason
    assert after[0].inputs["planned_rate"] == pytest.approx(4.0)  # the new interval alone, not a mean
    assert after[-1].inputs["planned_rate"] == pytest.approx(4.0)  # the 0.4 before the step is gone
    down = feed(policy, [2] * 12, start=150.0, replicas=after[-1].replicas)
    assert any("load shifted down" in d.reason for d in down[:2])  # judged on shift_window_s (10 s)
    assert down[-1].inputs["planned_rate"] == pytest.approx(0.4)
    assert down[-1].replicas < after[-1].replicas  # down after the 20 s scale-down window


def test_slo_falls_back_to_the_short_window_rate_without_a_per_interval_one():
    policy = slo_policy()
    d = policy.decide(obs(5.0, 1, arrival_rate=3.0, mean_prompt_len=256, mean_output_len=32))
    assert d.inputs["planned_rate"] == pytest.approx(3.0)
