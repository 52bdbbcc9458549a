"""How fast a pool may change size: Kubernetes HPA's ``behavior``, as one object every policy uses.

A policy computes a raw recommendation each tick; :class:`Stabilizer` turns it into the desired count:

* scale up to the *lowest* recommendation of the last ``scale_up_window_s`` (0: at once);
* scale down to the *highest* recommendation of the last ``scale_down_window_s`` (no flapping);
* at most ``max_step_up`` / ``max_step_down`` replicas per decision (0: no limit).

``tolerance`` belongs to ratio-based policies (``target``): a metric within that fraction of its target
leaves the pool as it is.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shoal.workers.options import option, validate


@dataclass(frozen=True)
class BehaviorConfig:
    scale_up_window_s: float = option(0.0, "scale up to the lowest recommendation of this many seconds", minimum=0)
    scale_down_window_s: float = option(300.0, "scale down to the highest recommendation of this many seconds",
                                        minimum=0)
    max_step_up: int = option(0, "most replicas added by one decision; 0: no limit", minimum=0)
    max_step_down: int = option(0, "most replicas removed by one decision; 0: no limit", minimum=0)

    def __post_init__(self) -> None:
        validate(self)


class Stabilizer:
    """Recommendations over time -> a desired count that obeys the windows and the step limits."""

    def __init__(self, config: BehaviorConfig) -> None:
        self.config = config
        self.history: deque[tuple[float, int]] = deque()

    def apply(self, now: float, current: int, raw: int) -> tuple[int, str]:
        cfg = self.config
        self.history.append((now, raw))
        horizon = max(cfg.scale_up_window_s, cfg.scale_down_window_s)
        while self.history and self.history[0][0] < now - horizon:
            self.history.popleft()
        up = min(r for t, r in self.history if t >= now - cfg.scale_up_window_s)
        down = max(r for t, r in self.history if t >= now - cfg.scale_down_window_s)
        if current < up:
            step = cfg.max_step_up
            desired = min(up, current + step) if step else up
            return desired, "up" if desired == up else f"up (limited to {step} a step)"
        if current > down:
            step = cfg.max_step_down
            desired = max(down, current - step) if step else down
            held = f", highest of {cfg.scale_down_window_s:g}s" if down > raw else ""
            return desired, f"down{held}"
        if raw < current:
            return current, f"held by the {cfg.scale_down_window_s:g}s scale-down window"
        return current, "steady"
