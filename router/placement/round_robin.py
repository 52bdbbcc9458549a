"""Round robin: each request starts one step further along the healthy workers, sorted by id."""

from __future__ import annotations

from typing import Sequence

from .base import BasePolicy, PlacementRequest, WorkerView, healthy_only, register_policy


@register_policy("round_robin")
class RoundRobinPolicy(BasePolicy):
    """Blind to load and cache; the baseline the other policies are measured against.

    Workers are ordered by id, not by the order the router lists them, so a membership change shifts
    the rotation by at most one position instead of reshuffling it.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        ids = sorted(w.worker_id for w in healthy_only(workers))
        if not ids:
            return []
        start = self._next % len(ids)
        self._next += 1
        return ids[start:] + ids[:start]
