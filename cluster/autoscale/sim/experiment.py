"""Traces x policies through the simulator, and the figures of each run.

Every policy of a trace sees the same requests, the same profile, SLO and control loop. The trace's
peak rate is ``peak_replicas`` replicas' worth of the capacity model's rate per replica, so the peak
needs several replicas. The baselines are sized by the same rule the ``slo`` policy uses (predicted
rate per replica times ``utilization``): ``static_peak`` at the trace's peak rate, ``static_mean`` at
its mean rate. ``target`` tracks running requests per replica at the concurrency the capacity model
predicts inside the SLO (the best target an HPA user could pick); ``queue`` keeps KEDA's defaults.
Autoscaled pools start with what the first second's rate needs and may grow to twice static peak.
Every policy runs behind the same router, which holds a request while every ready replica has
``max_open_per_worker`` open (by default the batch the capacity model allows inside the SLO): a
burst then waits at the router for the replicas it starts instead of piling onto the old ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from ..base import Bounds, make_policy
from ..capacity import CapacityModel, Mix, Slo
from ..profile import Profile
from .simulator import SimConfig, SimResult, Simulator
from .traces import TRACES, Trace, make_trace

POLICIES = ("static_peak", "static_mean", "target", "queue", "slo")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Experiment:
    profile: Profile
    ttft_s: float = 2.0
    itl_s: float = 0.15
    quantile: float = 0.9
    utilization: float = 0.8
    peak_replicas: int = 8
    duration_s: float = 3600.0
    input_len: int = 256
    output_len: int = 128
    seed: int = 0
    sim: SimConfig = field(default_factory=SimConfig)
    slo_options: Mapping = field(default_factory=dict)  # extra knobs of the slo policy
    max_open_per_worker: int | None = None  # the router's limit; None: the capacity model's batch; 0: off

    @property
    def mix(self) -> Mix:
        return Mix(self.input_len, self.output_len)

    def rate_per_replica(self) -> float:
        return CapacityModel(self.profile, Slo(self.ttft_s, self.itl_s, self.quantile)).rate("unified", self.mix)

    def trace(self, name: str) -> Trace:
        if self.rate_per_replica() <= 0:
            raise ValueError(f"profile {self.profile.model!r} on {self.profile.device} serves no rate inside TTFT "
                             f"<= {self.ttft_s:g} s and ITL <= {self.itl_s:g} s (p{self.quantile * 100:g}) for "
                             f"{self.input_len}-token prompts: loosen the SLO or profile a faster worker")
        return make_trace(name, self.peak_replicas * self.rate_per_replica(), self.duration_s, self.seed,
                          self.input_len, self.output_len)

    def open_limit(self) -> int:
        """Open requests a replica takes before the router holds new ones (0: no limit). Auto: the batch
        the capacity model predicts at a replica's full rate inside the SLO, rounded up."""
        if self.max_open_per_worker is not None:
            return self.max_open_per_worker
        model = CapacityModel(self.profile, Slo(self.ttft_s, self.itl_s, self.quantile))
        _, _, batch = model.unified_figures(self.rate_per_replica(), self.mix)
        return max(1, math.ceil(batch))

    def replicas_for(self, rate: float) -> int:
        return max(1, math.ceil(rate / (self.rate_per_replica() * self.utilization) - 1e-9))

    def policy(self, name: str, trace: Trace):
        """(policy, initial replicas) of ``name`` for ``trace``."""
        peak = self.replicas_for(trace.peak_rate)
        if name == "static_peak":
            return make_policy("static", Bounds(peak, peak), replicas=peak), peak
        if name == "static_mean":
            n = self.replicas_for(trace.mean_rate)
            return make_policy("static", Bounds(n, n), replicas=n), n
        bounds = Bounds(1, 2 * peak)
        initial = self.replicas_for(trace.rate_at(0.0))
        if name == "target":
            model = CapacityModel(self.profile, Slo(self.ttft_s, self.itl_s, self.quantile))
            _, _, batch = model.unified_figures(self.rate_per_replica() * self.utilization, self.mix)
            return make_policy("target", bounds, metric="num_running", target=float(batch)), initial
        if name == "queue":
            return make_policy("queue", bounds), initial
        if name == "slo":
            return make_policy("slo", bounds, self.profile, ttft_s=self.ttft_s, itl_s=self.itl_s,
                               quantile=self.quantile, utilization=self.utilization,
                               default_prompt_len=float(self.input_len), default_output_len=float(self.output_len),
                               **self.slo_options), initial
        raise ValueError(f"unknown policy {name!r}; choose from {list(POLICIES)}")

    def run_one(self, trace: Trace, name: str) -> SimResult:
        policy, initial = self.policy(name, trace)
        sim = Simulator(trace, self.profile, {"unified": policy}, {"unified": initial},
                        replace(self.sim, seed=self.seed, max_open_per_worker=self.open_limit()))
        return sim.run()

    def summarize(self, trace: Trace, name: str, result: SimResult) -> dict:
        reqs = result.requests
        ok = sum(1 for r in reqs if within_slo(r, self.ttft_s, self.itl_s))
        ttfts = sorted(r.ttft() for r in reqs if r.ttft() is not None)
        itls = sorted(r.itl() for r in reqs if r.itl() is not None)
        row = {"trace": trace.name, "policy": name, "requests": len(reqs),
               "slo_attainment": ok / len(reqs) if reqs else 1.0,
               "replica_hours": sum(result.replica_seconds.values()) / 3600,
               "goodput": ok / trace.duration_s, "scale_events": result.scale_events}
        for p in PERCENTILES:
            row[f"ttft_p{p}"] = percentile(ttfts, p)
        for p in PERCENTILES:
            row[f"itl_p{p}"] = percentile(itls, p)
        return row


def within_slo(r, ttft_s: float, itl_s: float) -> bool:
    ttft, itl = r.ttft(), r.itl()
    return ttft is not None and itl is not None and ttft <= ttft_s and itl <= itl_s


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(math.ceil(p / 100 * len(sorted_values))) - 1)]


def run_grid(exp: Experiment, traces: Sequence[str] = TRACES, policies: Sequence[str] = POLICIES):
    """{trace name: (Trace, {policy: SimResult})} and the summary rows."""
    runs, rows = {}, []
    for name in traces:
        trace = exp.trace(name)
        results = {p: exp.run_one(trace, p) for p in policies}
        runs[name] = (trace, results)
        rows += [exp.summarize(trace, p, r) for p, r in results.items()]
    return runs, rows
