"""``static``: a fixed replica count, the baselines (``static_peak`` / ``static_mean`` in the simulator
are this policy with the count that serves the trace's peak or mean rate)."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.workers.options import option, validate

from .base import Bounds, Decision, PoolObservation, register_policy


@dataclass(frozen=True)
class StaticConfig:
    replicas: int | None = option(None, "the fixed replica count; default: the pool's max_replicas", minimum=0)

    def __post_init__(self) -> None:
        validate(self)


@register_policy("static", StaticConfig)
class StaticPolicy:
    def __init__(self, config: StaticConfig, bounds: Bounds, profile=None) -> None:
        self.config, self.bounds = config, bounds

    def decide(self, obs: PoolObservation) -> Decision:
        n = self.bounds.max_replicas if self.config.replicas is None else self.config.replicas
        return Decision(self.bounds.clamp(n), "static", {"replicas": float(n)})
