"""``target``: Kubernetes-HPA-like target tracking of one pool metric per replica.

``desired = ceil(ready * value / target)`` where ``value`` is the pool's per-replica metric: the mean
KV usage, or running / waiting requests or computed tokens/s per ready replica. Within ``tolerance``
of the target nothing changes; :mod:`.behavior` then applies HPA's stabilization windows and step
limits. With no ready replica and work waiting it asks for one (activation, as KEDA and KPA do).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.workers.options import OptionError, option, validate

from .base import Bounds, Decision, PoolObservation, ceil_div, demand, register_policy
from .behavior import BehaviorConfig, Stabilizer

TARGET_METRICS = ("kv_usage", "num_running", "num_waiting", "tokens_per_s")


@dataclass(frozen=True)
class TargetConfig(BehaviorConfig):
    metric: str = option("kv_usage", "the metric tracked per replica", choices=TARGET_METRICS)
    target: float = option(0.8, "its target per replica (kv_usage: a fraction in (0, 1])", exclusive_minimum=0)
    tolerance: float = option(0.1, "a ratio to the target within this fraction changes nothing", minimum=0,
                              maximum=1)

    def __post_init__(self) -> None:
        validate(self)
        if self.metric == "kv_usage" and self.target > 1:
            raise OptionError("TargetConfig.target", f"must be in (0, 1] for metric kv_usage, got {self.target}",
                              "target")


def per_replica(obs: PoolObservation, metric: str) -> float:
    if metric == "kv_usage":
        return obs.kv_usage
    return getattr(obs, metric) / max(1, obs.ready_replicas)


@register_policy("target", TargetConfig)
class TargetPolicy:
    def __init__(self, config: TargetConfig, bounds: Bounds, profile=None) -> None:
        self.config, self.bounds = config, bounds
        self.stabilizer = Stabilizer(config)

    def decide(self, obs: PoolObservation) -> Decision:
        cfg = self.config
        value = per_replica(obs, cfg.metric)
        ratio = value / cfg.target
        if obs.ready_replicas == 0:
            raw = max(obs.replicas, 1 if demand(obs) else 0)
        elif abs(ratio - 1) <= cfg.tolerance:
            raw = obs.replicas
        else:
            raw = ceil_div(obs.ready_replicas * value, cfg.target)
        if demand(obs):
            raw = max(raw, 1)
        desired, why = self.stabilizer.apply(obs.now, obs.replicas, self.bounds.clamp(raw))
        return Decision(desired, f"{why}: {cfg.metric} {value:.3g}/replica vs target {cfg.target:g}",
                        {cfg.metric: value, "raw": float(raw)})
