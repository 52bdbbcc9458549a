"""``queue``: KEDA-like scaling on waiting requests (``vllm:num_requests_waiting``) and time in queue.

``desired = ceil(waiting / target_waiting)`` (KEDA's AverageValue target on the pool's queue), at
least one while the pool has work; a request that has waited longer than ``max_queue_time_s`` adds a
replica on top. HPA's windows and step limits then apply (:mod:`.behavior`).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.workers.options import option, validate

from .base import Bounds, Decision, PoolObservation, ceil_div, demand, register_policy
from .behavior import BehaviorConfig, Stabilizer


@dataclass(frozen=True)
class QueueConfig(BehaviorConfig):
    target_waiting: float = option(4.0, "waiting requests per replica to aim at", exclusive_minimum=0)
    max_queue_time_s: float = option(5.0, "a request waiting longer than this adds a replica; 0: off", minimum=0)

    def __post_init__(self) -> None:
        validate(self)


@register_policy("queue", QueueConfig)
class QueuePolicy:
    def __init__(self, config: QueueConfig, bounds: Bounds, profile=None) -> None:
        self.config, self.bounds = config, bounds
        self.stabilizer = Stabilizer(config)

    def decide(self, obs: PoolObservation) -> Decision:
        cfg = self.config
        raw = ceil_div(obs.num_waiting, cfg.target_waiting)
        late = cfg.max_queue_time_s > 0 and obs.max_queue_time_s > cfg.max_queue_time_s
        if late:
            raw = max(raw, obs.replicas + 1)
        if demand(obs):
            raw = max(raw, 1)
        desired, why = self.stabilizer.apply(obs.now, obs.replicas, self.bounds.clamp(raw))
        note = f", oldest waited {obs.max_queue_time_s:.1f}s" if late else ""
        return Decision(desired, f"{why}: {obs.num_waiting} waiting vs {cfg.target_waiting:g}/replica{note}",
                        {"num_waiting": float(obs.num_waiting), "max_queue_time_s": obs.max_queue_time_s,
                         "raw": float(raw)})
