"""Least load by the power of two choices: sample two healthy workers, keep the less loaded one.

Two random choices get exponentially better balance than one, without the herd that "always the
global minimum" causes when several routers act on the same stale load reports.
"""

from __future__ import annotations

import random
from typing import Sequence

from .base import BasePolicy, LoadWeights, PlacementRequest, WorkerView, healthy_only, register_policy


@register_policy("least_load")
class LeastLoadPolicy(BasePolicy):
    def __init__(self, rng: random.Random | None = None, waiting_weight: float = 1.0,
                 kv_usage_weight: float = 4.0) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.weights = LoadWeights(waiting=waiting_weight, kv_usage=kv_usage_weight)

    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        healthy = healthy_only(workers)
        if len(healthy) <= 1:
            return [w.worker_id for w in healthy]
        score = {w.worker_id: self.weights.score(w) for w in healthy}
        a, b = self.rng.sample(healthy, 2)
        winner = a if score[a.worker_id] <= score[b.worker_id] else b
        # After the winner, the rest by load: the order the router falls back in if the winner fails.
        rest = sorted((w.worker_id for w in healthy if w is not winner), key=lambda i: (score[i], i))
        return [winner.worker_id] + rest
