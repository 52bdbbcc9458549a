"""``shoal bench autoscale``: autoscaling policies on traces, simulated from a measured worker profile.

Each trace runs every policy (``static_peak``, ``static_mean``, ``target``, ``queue``, ``slo``) on the
same requests; the table and ``--result-file`` JSON have one entry per trace and policy, and
``--plot-dir`` gets one PNG per trace (load, replicas, TTFT p90 against time).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

from .report import format_table, write_json

COLUMNS = ("trace", "policy", "requests", "slo_attainment", "replica_hours", "goodput", "scale_events",
           "ttft_p50", "ttft_p90", "ttft_p99", "itl_p50", "itl_p90", "itl_p99")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.cluster.autoscale.sim.experiment import POLICIES
    from shoal.cluster.autoscale.sim.traces import TRACES
    from shoal.cluster.autoscale.slo import DEFAULT_PROFILE

    p.add_argument("--trace", choices=TRACES, default=None, help="one trace (default: all)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="a bundled profile name or a JSON file from "
                                                              "shoal bench profile (default: %(default)s)")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT target, s (default: %(default)s)")
    p.add_argument("--itl-slo", type=float, default=0.15, help="a request's mean ITL target, s (default: %(default)s)")
    p.add_argument("--peak-replicas", type=int, default=8,
                   help="the trace's peak rate, in replicas' worth of predicted capacity (default: %(default)s)")
    p.add_argument("--duration", type=float, default=3600.0, help="trace length, s (default: %(default)s)")
    p.add_argument("--cold-start", type=float, default=None, help="replica cold start, s (default: the profile's)")
    p.add_argument("--interval", type=float, default=5.0, help="control loop period, s (default: %(default)s)")
    p.add_argument("--max-open-per-worker", type=int, default=None,
                   help="the router holds a request while every replica has this many open; 0: no limit "
                        "(default: the batch the capacity model allows inside the SLO)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None)
    p.add_argument("--plot-dir", default=None, help="write autoscale-<trace>.png here")


def run_from_args(args: argparse.Namespace) -> dict:
    from shoal.cluster.autoscale.profile import Profile
    from shoal.cluster.autoscale.sim.experiment import Experiment, run_grid
    from shoal.cluster.autoscale.sim.simulator import SimConfig
    from shoal.cluster.autoscale.sim.traces import TRACES
    from shoal.cluster.autoscale.slo import SloConfig

    from .report import environment

    profile = Profile.load(args.profile)
    exp = Experiment(profile, ttft_s=args.ttft_slo, itl_s=args.itl_slo, peak_replicas=args.peak_replicas,
                     duration_s=args.duration, input_len=args.input_len, output_len=args.output_len, seed=args.seed,
                     max_open_per_worker=args.max_open_per_worker, sim=replace(SimConfig(), interval_s=args.interval, cold_start_s=args.cold_start))
    traces = [args.trace] if args.trace else list(TRACES)
    runs, rows = run_grid(exp, traces, [p for p in args.policies.split(",") if p])
    cold = profile.cold_start_s if args.cold_start is None else args.cold_start
    print(format_table(rows, COLUMNS, title=f"autoscaling, simulated from profile {profile.model} on "
                       f"{profile.device}; SLO TTFT <= {args.ttft_slo:g}s and ITL <= {args.itl_slo:g}s; "
                       f"cold start {cold:.1f}s; {exp.rate_per_replica():.2f} req/s per replica"))
    plots = []
    if args.plot_dir:
        from shoal.cluster.autoscale.sim.plot import plot_trace

        for name, (trace, results) in runs.items():
            plots.append(str(plot_trace(trace, results, f"{args.plot_dir}/autoscale-{name}.png", args.ttft_slo)))
    payload = {"benchmark": "autoscale", "env": environment(), "profile": profile.to_dict(),
               "settings": {"ttft_slo_s": args.ttft_slo, "itl_slo_s": args.itl_slo, "quantile": exp.quantile,
                            "utilization": exp.utilization, "peak_replicas": args.peak_replicas,
                            "duration_s": args.duration, "cold_start_s": cold, "interval_s": args.interval,
                            "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
                            "rate_per_replica": exp.rate_per_replica(), "max_open_per_worker": exp.open_limit(),
                            "slo_policy": asdict(SloConfig(**exp.slo_options))},
               "traces": {n: {"peak_rate": t.peak_rate, "mean_rate": t.mean_rate, "requests": len(t.requests)}
                          for n, (t, _) in runs.items()},
               "plots": plots, "results": rows}
    write_json(args.result_file, payload)
    return payload
