"""``slo``: size each pool from the arrival rate and request mix so TTFT and ITL stay inside their targets.

Like NVIDIA Dynamo's planner: capacity comes from a measured :class:`~.profile.Profile` through
:class:`~.capacity.CapacityModel`, not from latency after the fact, so a burst is answered on the
first tick that sees its arrivals. A prefill pool is sized by TTFT alone, a decode pool by ITL alone
(independently: each pool runs its own policy on its own observation), a unified pool by both.

``desired = ceil(planned_rate / (utilization * rate_per_replica))``. The planned rate is the arrival
rate measured since the load last **shifted**, over at most ``rate_window_s``: the policy keeps the
arrivals of each control interval, and a shift is a count no Poisson process at the current rate
would give (``shift_ratio`` times the expected count and 3.5 standard deviations from it: up on the
last interval alone, down on the last ``shift_window_s``). A shift drops the history before it, so
a burst is planned on at the tick that sees it and the level after it is not averaged with the one
before. Between shifts the long mean keeps Poisson noise out of the plan: a 10 s window at a few
requests a second is +-25 %, and the scale-down window then keeping the highest sample would
over-provision by half. On top: the trend over ``forecast_window_s`` extrapolated one cold start
ahead (replicas asked for now serve only that much later) and the backlog drained within
``backlog_drain_s``. The request mix is averaged over the same intervals. Scale-up is immediate;
scale-down waits ``scale_down_window_s`` (HPA's rule: the highest recommendation of the window).
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
    scale_down_window_s: float = option(20.0, "scale down to the highest recommendation of this many seconds",
                                        minimum=0)
    ttft_s: float = option(2.0, "time-to-first-token target, seconds", exclusive_minimum=0)
    itl_s: float = option(0.15, "inter-token latency target (a request's mean), seconds", exclusive_minimum=0)
    quantile: float = option(0.9, "the quantile that must meet the targets", choices=(0.5, 0.9, 0.95, 0.99))
    utilization: float = option(0.8, "fraction of the predicted capacity to plan on (headroom for noise)",
                                exclusive_minimum=0, maximum=1)
    rate_window_s: float = option(60.0, "plan on the arrival rate of at most this many seconds since the load "
                                  "last shifted", exclusive_minimum=0)
    shift_ratio: float = option(2.0, "a count this many times the expected one (or 1/this of it) is a shift in "
                                "load: the rate is planned on anew", minimum=1)
    shift_window_s: float = option(10.0, "seconds of arrivals a shift down is judged on", exclusive_minimum=0)
    forecast: bool = option(False, "plan on the arrival trend extrapolated one cold start ahead (noisy: "
                            "a step in load is caught as a shift without it)")
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


def trend(history, now: float, window_s: float) -> float:
    """Least-squares slope (requests/s per s) of the rates seen within ``window_s``."""
    points = [(t, r) for t, r in history if t >= now - window_s]
    if len(points) < 3:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mr = sum(r for _, r in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var > 0 else 0.0


SHIFT_SIGMAS = 3.5  # a shift is a count this many Poisson standard deviations from the expected one


def rate_of(intervals) -> float:
    """Arrivals per second over ``(time, seconds, arrivals, ...)`` intervals."""
    span = sum(i[1] for i in intervals)
    return sum(i[2] for i in intervals) / span if span > 0 else 0.0


def shifted(count: float, expected: float, ratio: float) -> str:
    """``count`` arrivals where a Poisson process would give ``expected``: "up" / "down" when too far off
    to be noise (``ratio`` times and ``SHIFT_SIGMAS`` standard deviations), else ""."""
    sigmas = SHIFT_SIGMAS * expected ** 0.5
    if count > expected and count >= ratio * expected and count >= expected + sigmas:
        return "up"
    if count < expected and count * ratio <= expected and count <= expected - sigmas:
        return "down"
    return ""


@register_policy("slo", SloConfig)
class SloPolicy:
    def __init__(self, config: SloConfig, bounds: Bounds, profile: Profile | None = None) -> None:
        self.config, self.bounds = config, bounds
        self.profile = profile if profile is not None else Profile.load(config.profile)
        self.model = CapacityModel(self.profile, Slo(config.ttft_s, config.itl_s, config.quantile))
        self.stabilizer = Stabilizer(config)
        # one entry per observation: (time, seconds since the previous one, arrivals in them, mean prompt
        # length, mean output length); what came before the last shift in load is dropped
        self.intervals: deque[tuple[float, float, float, float, float]] = deque()
        self.mix = Mix(config.default_prompt_len, config.default_output_len)
        self._rates: dict[Mix, float] = {}

    def rate_per_replica(self, role: str, mix: Mix) -> float:
        key = Mix(round(mix.prompt_len, -1) or 10, round(mix.output_len, -1) or 10)  # few distinct solves
        if (role, key) not in self._rates:
            self._rates[(role, key)] = self.model.rate(role, key)
        return self._rates[(role, key)]

    def observe(self, obs: PoolObservation) -> tuple[float, str]:
        """Record ``obs``'s arrivals; (the rate since the last shift, "up" / "down" if it shifted now, else "")."""
        cfg = self.config
        last = self.intervals[-1][0] if self.intervals else None
        dt = obs.now - last if last is not None else 0.0
        rate = obs.arrival_rate if obs.recent_arrival_rate is None else obs.recent_arrival_rate
        self.intervals.append((obs.now, dt, rate * dt, obs.mean_prompt_len, obs.mean_output_len))
        while self.intervals and self.intervals[0][0] < obs.now - max(cfg.rate_window_s, cfg.forecast_window_s):
            self.intervals.popleft()
        before = list(self.intervals)[:-1]
        shift, keep = "", 0
        if sum(i[1] for i in before) < cfg.shift_window_s:
            pass  # too little seen since the last shift to call the next one
        elif dt > 0 and shifted(rate * dt, rate_of(before) * dt, cfg.shift_ratio) == "up":
            shift, keep = "up", 1  # the last interval alone is the new level's best guess
        else:
            recent = [i for i in self.intervals if i[0] > obs.now - cfg.shift_window_s]
            older = list(self.intervals)[:len(self.intervals) - len(recent)]
            span = sum(i[1] for i in recent)
            if older and span > 0 and shifted(sum(i[2] for i in recent), rate_of(older) * span,
                                              cfg.shift_ratio) == "down":
                shift, keep = "down", len(recent)  # judged on shift_window_s: less noise than one interval
        if shift:
            while len(self.intervals) > keep:
                self.intervals.popleft()
        window = [i for i in self.intervals if i[0] >= obs.now - cfg.rate_window_s]
        seen = [i for i in window if i[2] > 0 and i[3] > 0 and i[4] > 0]
        if seen:  # the mix, weighted by each interval's arrivals
            total = sum(i[2] for i in seen)
            self.mix = Mix(sum(i[2] * i[3] for i in seen) / total, sum(i[2] * i[4] for i in seen) / total)
        return (rate_of(window) if sum(i[1] for i in window) > 0 else obs.arrival_rate), shift

    def planned_rate(self, obs: PoolObservation) -> tuple[float, str]:
        """(requests/s to provision for, "up" / "down" when the load shifted at this observation)."""
        cfg = self.config
        rate, shift = self.observe(obs)
        if cfg.forecast and not shift:  # a trend across a step in load would overshoot it
            points = [(t, c / dt) for t, dt, c, _, _ in self.intervals if dt > 0]
            rate = max(rate, rate + trend(points, obs.now, cfg.forecast_window_s) * self.profile.cold_start_s)
        return rate + obs.num_waiting / cfg.backlog_drain_s, shift

    def decide(self, obs: PoolObservation) -> Decision:
        cfg = self.config
        planned, shift = self.planned_rate(obs)
        per_replica = self.rate_per_replica(obs.pool, self.mix) * cfg.utilization
        raw = ceil_div(planned, per_replica) if per_replica > 0 else self.bounds.max_replicas
        if demand(obs):
            raw = max(raw, 1)
        desired, why = self.stabilizer.apply(obs.now, obs.replicas, self.bounds.clamp(raw))
        return Decision(desired, f"{why}: planned {planned:.2f} req/s{f' (load shifted {shift})' if shift else ''} at {per_replica:.2f} req/s a replica "
                        f"({obs.pool}, prompt {self.mix.prompt_len:.0f}, output {self.mix.output_len:.0f})",
                        {"arrival_rate": obs.arrival_rate, "planned_rate": planned,
                         "rate_per_replica": per_replica, "raw": float(raw)})
