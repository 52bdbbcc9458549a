"""``slo``: size each pool from the arrival rate and request mix so TTFT and ITL stay inside their targets.

Like NVIDIA Dynamo's planner: capacity comes from a measured :class:`~.profile.Profile` through
:class:`~.capacity.CapacityModel`, not from latency after the fact, so a burst is answered on the
first tick that sees its arrivals. A prefill pool is sized by TTFT alone, a decode pool by ITL alone
(independently: each pool runs its own policy on its own observation), a unified pool by both.

``desired = ceil(planned_rate / (utilization * rate_per_replica))`` where the planned rate is the
larger of the observed rate and its short-horizon forecast (a linear trend over ``forecast_window_s``
extrapolated one cold start ahead: replicas asked for now serve only that much later), plus the
backlog drained within ``backlog_drain_s``. Scale-up is immediate; scale-down waits
``scale_down_window_s`` (HPA's rule: the highest recommendation of the window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shoal.workers.options import option, validate

from .base import Bounds, Decision, PoolObservation, ceil_div, demand, register_policy
from .behavior import BehaviorConfig, Stabilizer
from .capacity import CapacityModel, Mix, Slo
from .profile import Profile

DEFAULT_PROFILE = "smollm2-135m-cpu"


@dataclass(frozen=True)
class SloConfig(BehaviorConfig):
    scale_down_window_s: float = option(60.0, "scale down to the highest recommendation of this many seconds",
                                        minimum=0)
    ttft_s: float = option(2.0, "time-to-first-token target, seconds", exclusive_minimum=0)
    itl_s: float = option(0.15, "inter-token latency target (a request's mean), seconds", exclusive_minimum=0)
    quantile: float = option(0.9, "the quantile that must meet the targets", choices=(0.5, 0.9, 0.95, 0.99))
    utilization: float = option(0.8, "fraction of the predicted capacity to plan on (headroom for noise)",
                                exclusive_minimum=0, maximum=1)
    forecast: bool = option(True, "plan on the arrival trend extrapolated one cold start ahead")
    forecast_window_s: float = option(30.0, "seconds of arrival history the trend is fitted on",
                                      exclusive_minimum=0)
    backlog_drain_s: float = option(10.0, "plan to drain the current queue within this many seconds",
                                    exclusive_minimum=0)
    profile: str = option(DEFAULT_PROFILE, "the worker profile: a bundled name or a JSON file from "
                          "shoal bench profile")
    default_prompt_len: float = option(256.0, "prompt length assumed before any request was seen",
                                       exclusive_minimum=0)
    default_output_len: float = option(128.0, "output length assumed before any request was seen",
                                       exclusive_minimum=0)

    def __post_init__(self) -> None:
        validate(self)


def trend(history: deque, now: float, window_s: float) -> float:
    """Least-squares slope (requests/s per s) of the rates seen within ``window_s``."""
    points = [(t, r) for t, r in history if t >= now - window_s]
    if len(points) < 3:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mr = sum(r for _, r in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var > 0 else 0.0


@register_policy("slo", SloConfig)
class SloPolicy:
    def __init__(self, config: SloConfig, bounds: Bounds, profile: Profile | None = None) -> None:
        self.config, self.bounds = config, bounds
        self.profile = profile if profile is not None else Profile.load(config.profile)
        self.model = CapacityModel(self.profile, Slo(config.ttft_s, config.itl_s, config.quantile))
        self.stabilizer = Stabilizer(config)
        self.history: deque[tuple[float, float]] = deque()
        self.mix = Mix(config.default_prompt_len, config.default_output_len)
        self._rates: dict[Mix, float] = {}

    def rate_per_replica(self, role: str, mix: Mix) -> float:
        key = Mix(round(mix.prompt_len, -1) or 10, round(mix.output_len, -1) or 10)  # few distinct solves
        if (role, key) not in self._rates:
            self._rates[(role, key)] = self.model.rate(role, key)
        return self._rates[(role, key)]

    def planned_rate(self, obs: PoolObservation) -> float:
        cfg = self.config
        self.history.append((obs.now, obs.arrival_rate))
        while self.history and self.history[0][0] < obs.now - cfg.forecast_window_s:
            self.history.popleft()
        rate = obs.arrival_rate
        if cfg.forecast:
            rate = max(rate, rate + trend(self.history, obs.now, cfg.forecast_window_s) * self.profile.cold_start_s)
        return rate + obs.num_waiting / cfg.backlog_drain_s

    def decide(self, obs: PoolObservation) -> Decision:
        cfg = self.config
        if obs.mean_prompt_len > 0 and obs.mean_output_len > 0:
            self.mix = Mix(obs.mean_prompt_len, obs.mean_output_len)
        planned = self.planned_rate(obs)
        per_replica = self.rate_per_replica(obs.pool, self.mix) * cfg.utilization
        raw = ceil_div(planned, per_replica) if per_replica > 0 else self.bounds.max_replicas
        if demand(obs):
            raw = max(raw, 1)
        desired, why = self.stabilizer.apply(obs.now, obs.replicas, self.bounds.clamp(raw))
        return Decision(desired, f"{why}: planned {planned:.2f} req/s at {per_replica:.2f} req/s a replica "
                        f"({obs.pool}, prompt {self.mix.prompt_len:.0f}, output {self.mix.output_len:.0f})",
                        {"arrival_rate": obs.arrival_rate, "planned_rate": planned,
                         "rate_per_replica": per_replica, "raw": float(raw)})
