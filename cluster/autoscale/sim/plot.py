"""One PNG per trace: the load, replicas and TTFT p90 against time, one line per policy."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .experiment import percentile
from .simulator import SimResult
from .traces import Trace


def ttft_series(result: SimResult, bucket_s: float, duration_s: float) -> tuple[list[float], list[float]]:
    """(bucket midpoints, TTFT p90 of the requests arriving in each bucket; unserved ones count as inf)."""
    buckets: dict[int, list[float]] = {}
    for r in result.requests:
        ttft = r.ttft()
        buckets.setdefault(int(r.arrival // bucket_s), []).append(float("inf") if ttft is None else ttft)
    xs, ys = [], []
    for i in range(int(duration_s // bucket_s) + 1):
        if i in buckets:
            xs.append((i + 0.5) * bucket_s)
            ys.append(percentile(sorted(buckets[i]), 90))
    return xs, ys


def plot_trace(trace: Trace, results: Mapping[str, SimResult], path: str | Path, ttft_slo_s: float,
               bucket_s: float = 30.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load, reps, lat) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    xs = [s for s, _ in trace.segments] + [trace.duration_s]
    load.step(xs, [r for _, r in trace.segments] + [trace.segments[-1][1]], where="post", color="black",
              label="trace rate")
    arrivals: dict[int, int] = {}
    for r in trace.requests:
        arrivals[int(r.arrival // bucket_s)] = arrivals.get(int(r.arrival // bucket_s), 0) + 1
    load.plot([(i + 0.5) * bucket_s for i in sorted(arrivals)], [arrivals[i] / bucket_s for i in sorted(arrivals)],
              color="gray", alpha=0.6, label=f"arrivals ({bucket_s:g}s)")
    load.set_ylabel("requests/s")
    load.legend(loc="upper right")
    for name, result in results.items():
        for pool in (result.ticks[0].replicas if result.ticks else {}):
            reps.step([t.t for t in result.ticks], [t.replicas[pool] for t in result.ticks], where="post",
                      label=name if pool == "unified" else f"{name} {pool}")
        tx, ty = ttft_series(result, bucket_s, trace.duration_s)
        lat.plot(tx, [min(y, 1e3) for y in ty], label=name)
    reps.set_ylabel("replicas")
    reps.legend(loc="upper right", ncol=3, fontsize="small")
    lat.axhline(ttft_slo_s, color="red", linestyle="--", linewidth=1, label="TTFT SLO")
    lat.set_yscale("log")
    lat.set_ylabel(f"TTFT p90 (s, per {bucket_s:g}s)")
    lat.set_xlabel("time (s)")
    lat.legend(loc="upper right", ncol=3, fontsize="small")
    lat.set_xlim(0, trace.duration_s)
    fig.suptitle(f"autoscaling on the {trace.name} trace")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
