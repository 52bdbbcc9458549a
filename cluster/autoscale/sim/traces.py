"""Arrival traces for the simulator: a rate curve in units of the peak, and the requests it draws.

Shapes (``rate(t) / peak``, ``t`` in ``[0, duration)``):

* ``steady``: Poisson at the peak all along;
* ``diurnal``: one day squeezed into the trace: 0.2 at night, 1.0 at noon, a cosine between;
* ``bursty``: a two-state MMPP (on/off): the peak for exponentially distributed on-periods (mean
  120 s), 0.2 of it for off-periods (mean 240 s);
* ``spike``: 0.1 of the peak, then 10x (the peak) for 300 s from a third of the way in.

Arrivals are a non-homogeneous Poisson process (thinning of the piecewise-constant curve); request
sizes come from ``shoal bench``'s ``random`` workload generator (cluster/bench/datasets.py).
The same seed gives the same requests for every policy.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from shoal.cluster.bench.datasets import DatasetConfig, random_sessions

TRACES = ("steady", "diurnal", "bursty", "spike")


@dataclass(frozen=True)
class TraceRequest:
    arrival: float
    prompt_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Trace:
    name: str
    duration_s: float
    peak_rate: float
    segments: tuple[tuple[float, float], ...]  # (start time, rate in req/s), piecewise constant
    requests: tuple[TraceRequest, ...]

    def rate_at(self, t: float) -> float:
        return rate_at(self.segments, t)

    @property
    def mean_rate(self) -> float:
        d = self.duration_s
        ends = [s for s, _ in self.segments[1:]] + [d]
        return sum(max(0.0, min(e, d) - min(s, d)) * r for (s, r), e in zip(self.segments, ends)) / d


def shape(name: str, duration_s: float, rng: random.Random, step_s: float = 10.0) -> list[tuple[float, float]]:
    """``(start, fraction of peak)`` segments of trace ``name``."""
    if name == "steady":
        return [(0.0, 1.0)]
    if name == "diurnal":
        n = max(1, int(duration_s // step_s))
        return [(i * step_s, 0.2 + 0.8 * (1 - math.cos(2 * math.pi * (i + 0.5) * step_s / duration_s)) / 2)
                for i in range(n)]
    if name == "bursty":
        out, t, on = [], 0.0, False
        while t < duration_s:
            out.append((t, 1.0 if on else 0.2))
            t += rng.expovariate(1 / (120.0 if on else 240.0))
            on = not on
        return out
    if name == "spike":
        start = duration_s / 3
        return [(0.0, 0.1), (start, 1.0), (start + 300.0, 0.1)]
    raise ValueError(f"unknown trace {name!r}; choose one of {list(TRACES)}")


def make_trace(name: str, peak_rate: float, duration_s: float = 3600.0, seed: int = 0,
               input_len: int = 256, output_len: int = 128, range_ratio: float = 0.5) -> Trace:
    rng = random.Random(f"{name}-{seed}")
    segments = [(s, f * peak_rate) for s, f in shape(name, duration_s, rng)]
    return trace_of(name, segments, duration_s, seed, input_len, output_len, range_ratio, rng)


def trace_of(name: str, segments, duration_s: float, seed: int = 0, input_len: int = 256, output_len: int = 128,
             range_ratio: float = 0.5, rng: random.Random | None = None, regular: bool = False) -> Trace:
    """The requests of piecewise-constant ``(start, rate in req/s)`` segments over ``duration_s``: a
    Poisson process, or with ``regular`` evenly spaced arrivals (a segment at rate r: one every 1/r s)."""
    rng = rng or random.Random(f"{name}-{seed}")
    segments = [(float(s), float(r)) for s, r in segments]
    peak_rate = max(r for _, r in segments)
    arrivals = regular_arrivals(segments, duration_s) if regular else poisson_arrivals(segments, duration_s, rng)
    sessions = random_sessions(DatasetConfig(name="random", num_prompts=max(1, len(arrivals)), seed=seed,
                                             input_len=input_len, output_len=output_len, range_ratio=range_ratio))
    requests = tuple(TraceRequest(a, s.turns[0].prompt, s.turns[0].output_len) for a, s in zip(arrivals, sessions))
    return Trace(name, duration_s, peak_rate, tuple(segments), requests)


def poisson_arrivals(segments, duration_s: float, rng: random.Random) -> list[float]:
    """A non-homogeneous Poisson process: candidates at the peak rate, each kept with probability
    rate(t) / peak (thinning)."""
    peak_rate = max(r for _, r in segments)
    arrivals, t = [], 0.0
    while peak_rate > 0:
        t += rng.expovariate(peak_rate)
        if t >= duration_s:
            break
        if rng.random() * peak_rate <= rate_at(segments, t):
            arrivals.append(t)
    return arrivals


def regular_arrivals(segments, duration_s: float) -> list[float]:
    """One arrival every 1/rate seconds in each segment, the first half a gap after its start."""
    out = []
    ends = [start for start, _ in segments[1:]] + [duration_s]
    for (start, rate), end in zip(segments, ends):
        if rate > 0:
            t = start + 0.5 / rate
            while t < min(end, duration_s):
                out.append(t)
                t += 1.0 / rate
    return out


def rate_at(segments, t: float) -> float:
    """The rate of piecewise-constant ``(start, rate)`` segments at time ``t``."""
    i = bisect.bisect_right([s for s, _ in segments], t) - 1
    return segments[max(i, 0)][1]
