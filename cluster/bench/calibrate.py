"""``shoal bench calibrate``: the autoscaling simulator against a live deployment, on one load step.

1. **Profile** the worker on this machine (``shoal bench profile``'s measurement, one thread, as a
   Ray worker runs) or read one (``--profile``).
2. **Live**: ``shoal launch``'s :class:`~shoal.cluster.launch.Launch` on the connected Ray cluster
   (a local one unless ``--address``) and an embedded etcd: one ``unified`` pool from
   ``--min-replicas`` with the ``slo`` policy on that profile, up to ``--max-replicas``. A load step
   (``--base-rate`` req/s for ``--base-s``, then ``--peak-rate`` for ``--peak-s``, Poisson) goes through
   the router at its arrival times (``shoal bench serve``'s client, streaming); the pool's replicas are
   sampled throughout, and after the load the run waits (up to ``--settle-s``) for the pool to shrink
   back to its minimum.
3. **Replay**: the simulator (:mod:`shoal.cluster.autoscale.sim`) on the same requests, with the same
   policy built from the same spec block, the same profile, control period and rate window, and the
   cold start the live run measured (decision to serving, per replica it added).

The table puts the live figures beside the simulated ones; the issue's criterion is TTFT p90 within
30 % (``ttft_p90_error``). ``--result-file`` writes everything, every request included.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.cluster.autoscale.profile import Profile
from shoal.cluster.autoscale.sim.experiment import percentile
from shoal.cluster.autoscale.sim.simulator import SimConfig, SimResult, Simulator
from shoal.cluster.autoscale.sim.traces import Trace, trace_of
from shoal.cluster.spec import DeploymentSpec

from .report import environment, format_table, write_json
from .serve import BenchConfig, RequestResult, discover_model, send_request

POOL = "unified"
TOLERANCE = 0.30  # the simulator's TTFT p90 within this fraction of the live one


@dataclass(frozen=True)
class Calibration:
    """One calibration run's settings (the CLI's flags)."""

    model: str = "smollm2-135m"
    base_rate: float = 0.5  # req/s before the step
    peak_rate: float = 2.0  # req/s during it
    base_s: float = 10.0
    peak_s: float = 30.0
    input_len: int = 64
    output_len: int = 32
    seed: int = 0
    regular: bool = False  # evenly spaced arrivals instead of Poisson (no noise in the policy's rate)
    min_replicas: int = 1
    max_replicas: int = 3
    ttft_s: float = 2.0  # the slo policy's targets
    itl_s: float = 0.5
    interval_s: float = 1.0  # the control loop's period
    window_s: float = 10.0  # the rate window of its observations
    scale_down_window_s: float = 5.0
    settle_s: float = 60.0  # after the load, at most this long for the pool to shrink back
    engine: dict = field(default_factory=lambda: {"device": "cpu", "dtype": "float32", "max_model_len": 1024})

    def trace(self) -> Trace:
        end = self.base_s + self.peak_s
        return trace_of("step", [(0.0, self.base_rate), (self.base_s, self.peak_rate), (end, 0.0)], end,
                        self.seed, self.input_len, self.output_len, range_ratio=0.0, regular=self.regular)

    def spec(self, profile_path: str, etcd_endpoint: str, tokenizer: str | None = None) -> DeploymentSpec:
        engine = dict(self.engine, **({"tokenizer": tokenizer} if tokenizer else {}))
        return DeploymentSpec.from_dict({
            "name": "calibrate", "model": self.model,
            "pools": {POOL: {"replicas": self.min_replicas, "resources_per_rank": {"CPU": 1}, "engine": engine}},
            "router": {"policy": "least_load"},
            "etcd": {"endpoints": etcd_endpoint},
            "autoscaling": {POOL: {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                   "policy": "slo", "profile": profile_path, "ttft_s": self.ttft_s,
                                   "itl_s": self.itl_s, "scale_down_window_s": self.scale_down_window_s,
                                   # the mix it plans on until requests finish (its defaults are 256 / 128)
                                   "default_prompt_len": float(self.input_len),
                                   "default_output_len": float(self.output_len)}}})


# -- the live run -----------------------------------------------------------------------------------

@dataclass
class LiveRun:
    requests: list[tuple[float, RequestResult]]  # (arrival offset, result), in trace order
    samples: list[tuple[float, int, int]]  # (seconds since the load began, serving, starting)
    cold_starts_s: list[float]  # decision to serving, per replica added
    grown_at_s: float | None  # when the pool first had more than its minimum (serving or starting)
    shrunk_at_s: float | None  # when it was back at its minimum after that (None: not within settle_s)
    load_s: float  # seconds from the first arrival to the last request's end


class _Watch:
    """Samples the pool every ``period_s`` and times each added replica from its start to serving."""

    def __init__(self, controller, t0: float, period_s: float = 0.2) -> None:
        self.controller, self.t0, self.period_s = controller, t0, period_s
        self.samples: list[tuple[float, int, int]] = []
        self.started: dict[str, float] = {}
        self.served: dict[str, float] = {}
        self.initial = {d["replica"] for d in controller.describe()}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic() - self.t0
            serving, starting = self.controller.counts(POOL)
            self.samples.append((now, serving, starting))
            for d in self.controller.describe():
                name = d["replica"]
                if name in self.initial:
                    continue
                self.started.setdefault(name, now)
                if d["state"] == "serving":
                    self.served.setdefault(name, now)
            try:
                await asyncio.wait_for(stop.wait(), self.period_s)
            except asyncio.TimeoutError:
                pass

    def cold_starts(self) -> list[float]:
        return [self.served[n] - self.started[n] for n in self.served]

    def grown_and_shrunk(self, minimum: int) -> tuple[float | None, float | None]:
        """When the pool first went above ``minimum``, and when it was back at it after that."""
        grown = next((t for t, s, st in self.samples if s + st > minimum), None)
        if grown is None:
            return None, None
        return grown, next((t for t, s, st in self.samples if t > grown and (s, st) == (minimum, 0)), None)


async def _send_trace(url: str, trace: Trace, t0: float) -> list[tuple[float, RequestResult]]:
    import httpx

    cfg = BenchConfig(base_url=url, timeout_s=120.0)
    async with httpx.AsyncClient(base_url=url, timeout=cfg.timeout_s) as client:
        model = await discover_model(client)

        async def one(i: int, arrival: float, prompt: tuple[int, ...], output_len: int) -> tuple[float, RequestResult]:
            await asyncio.sleep(max(0.0, t0 + arrival - time.monotonic()))
            result = RequestResult(f"c{i}", 0, len(prompt), start=time.monotonic() - t0)
            body = {"model": model, "prompt": list(prompt), "max_tokens": output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            return arrival, await send_request(client, cfg, body, result, {})

        return list(await asyncio.gather(*(one(i, r.arrival, r.prompt_ids, r.output_len)
                                           for i, r in enumerate(trace.requests))))


async def run_live(spec: DeploymentSpec, trace: Trace, client, etcd_endpoint: str, cal: Calibration) -> LiveRun:
    """Launch ``spec`` on the connected Ray cluster, send ``trace`` through its router, watch the pool."""
    from shoal.cluster.launch import Launch

    launch = Launch(spec, client, etcd_endpoints=etcd_endpoint, node_ip="127.0.0.1", host="127.0.0.1", port=0,
                    lease_ttl_s=3, start_timeout_s=300.0, autoscale_interval_s=cal.interval_s,
                    autoscale_window_s=cal.window_s)
    stop, watch_stop = asyncio.Event(), asyncio.Event()
    try:
        url = (await launch.start())[0]
        runner = asyncio.create_task(launch.run(stop, interval_s=0.5))
        t0 = time.monotonic() + 0.5
        watch = _Watch(launch.controller, t0)
        watcher = asyncio.create_task(watch.run(watch_stop))
        try:
            requests = await _send_trace(url, trace, t0)
            load_s = time.monotonic() - t0
            while time.monotonic() - t0 - load_s < cal.settle_s and watch.grown_and_shrunk(cal.min_replicas)[1] is None:
                await asyncio.sleep(0.2)
        finally:
            watch_stop.set()
            await watcher
            stop.set()
            await runner
    finally:
        await launch.stop()
    return LiveRun(requests, watch.samples, watch.cold_starts(), *watch.grown_and_shrunk(cal.min_replicas), load_s)


# -- the replay and the comparison ------------------------------------------------------------------

def replay(spec: DeploymentSpec, trace: Trace, profile: Profile, cal: Calibration,
           cold_start_s: float) -> SimResult:
    """The simulator on ``trace`` with the policy the live loop built from the same spec block."""
    from shoal.cluster.autoscale.live import make_pool_policy

    policy = make_pool_policy(POOL, spec.autoscaling[POOL])
    config = SimConfig(interval_s=cal.interval_s, window_s=cal.window_s, cold_start_s=cold_start_s,
                       placement=spec.router.policy, seed=cal.seed, max_open_per_worker=0)
    return Simulator(trace, profile, {POOL: policy}, {POOL: spec.pools[POOL].replicas}, config).run()


def _replica_seconds(samples: list[tuple[float, int, int]], end: float) -> float:
    total = 0.0
    for (t, serving, starting), (t_next, _, _) in zip(samples, samples[1:] + [(end, 0, 0)]):
        if t < end:
            total += (serving + starting) * (min(t_next, end) - t)
    return total


def compare(live: LiveRun, sim: SimResult, duration_s: float) -> list[dict]:
    """Rows ``{figure, live, simulated, error}`` (error: simulated / live - 1, where it means something)."""
    ok = [r for _, r in live.requests if r.success]
    live_ttft = sorted(r.ttft for r in ok)
    live_itl = sorted(statistics.fmean(r.itl) if r.itl else 0.0 for r in ok)
    sim_ttft = sorted(t for r in sim.requests if (t := r.ttft()) is not None)
    sim_itl = sorted(i for r in sim.requests if (i := r.itl()) is not None)
    figures = [
        ("requests", len(live.requests), len(sim.requests)),
        ("failed", len(live.requests) - len(ok), len(sim.requests) - len(sim_ttft)),
        ("ttft_p50_s", percentile(live_ttft, 50), percentile(sim_ttft, 50)),
        ("ttft_p90_s", percentile(live_ttft, 90), percentile(sim_ttft, 90)),
        ("ttft_p99_s", percentile(live_ttft, 99), percentile(sim_ttft, 99)),
        ("itl_p50_s", percentile(live_itl, 50), percentile(sim_itl, 50)),
        ("itl_p90_s", percentile(live_itl, 90), percentile(sim_itl, 90)),
        ("max_replicas", max((s + st for _, s, st in live.samples), default=0),
         max((max(t.replicas.values()) for t in sim.ticks), default=0)),
        ("replica_seconds", _replica_seconds(live.samples, duration_s), sum(sim.replica_seconds.values())),
    ]
    rows = []
    for name, a, b in figures:
        error = (b / a - 1) if isinstance(a, float) and isinstance(b, float) and a > 0 else None
        rows.append({"figure": name, "live": a, "simulated": b, "error": error})
    return rows


# -- the command ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Calibration()
    p.add_argument("--model", default=d.model, help="a preset name or a model directory (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="the workers' tokenizer (default: the model's)")
    p.add_argument("--profile", default=None,
                   help="a profile JSON (shoal bench profile --output); default: measure one now")
    p.add_argument("--address", default=None, help="a Ray cluster to use (default: start a local one)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster; each "
                   "replica takes 1 (default: %(default)s)")
    for name, help_text in (("base_rate", "req/s before the step"), ("peak_rate", "req/s during the step"),
                            ("base_s", "seconds before the step"), ("peak_s", "seconds of the step"),
                            ("ttft_s", "the slo policy's TTFT target, s"), ("itl_s", "its ITL target, s"),
                            ("interval_s", "the control loop's period, s"), ("window_s", "its rate window, s"),
                            ("scale_down_window_s", "the slo policy's scale-down window, s"),
                            ("settle_s", "after the load, at most this long for the pool to shrink back, s")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=getattr(d, name),
                       help=f"{help_text} (default: %(default)s)")
    for name, help_text in (("input_len", "prompt tokens per request"), ("output_len", "tokens generated per request"),
                            ("seed", "the trace's seed"), ("min_replicas", "the pool's lower bound (and start)"),
                            ("max_replicas", "the pool's upper bound")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=getattr(d, name),
                       help=f"{help_text} (default: %(default)s)")
    p.add_argument("--regular", action="store_true", help="evenly spaced arrivals instead of Poisson")
    p.add_argument("--result-file", default=None)


def measure_profile(model: str, engine: dict, tokenizer: str | None) -> Profile:
    """A quick profile of one replica as a Ray worker runs it (one thread)."""
    import torch

    from shoal.workers import LLM

    from .profile import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        llm = LLM(model, **engine, **({"tokenizer": tokenizer} if tokenizer else {}), enable_prefix_caching=False)
        cold = time.perf_counter() - start
        try:
            return measure(llm, model, cold, (16, 64, 128, 256), (1, 4, 8, 16), (64, 256), decode_steps=6,
                           repeats=2)
        finally:
            llm.shutdown()
    finally:
        torch.set_num_threads(threads)


async def calibrate(cal: Calibration, profile: Profile, profile_path: str, tokenizer: str | None = None) -> dict:
    """The live run and its replay on the connected Ray cluster -> the JSON payload."""
    from shoal.cluster.etcd import EmbeddedEtcd
    from shoal.cluster.registry import connect

    trace = cal.trace()
    with tempfile.TemporaryDirectory(prefix="shoal-calibrate-") as tmp:
        etcd = EmbeddedEtcd(Path(tmp) / "etcd", host="127.0.0.1", unsafe_no_fsync=True).start()
        try:
            client = await connect(etcd.endpoint)
            try:
                spec = cal.spec(profile_path, etcd.endpoint, tokenizer)
                live = await run_live(spec, trace, client, etcd.endpoint, cal)
            finally:
                await client.close()
        finally:
            etcd.stop()
    cold = statistics.median(live.cold_starts_s) if live.cold_starts_s else profile.cold_start_s
    sim = replay(spec, trace, profile, cal, cold)
    rows = compare(live, sim, trace.duration_s)
    ttft = next(r for r in rows if r["figure"] == "ttft_p90_s")
    return {"benchmark": "calibrate", "env": environment(), "settings": cal.__dict__ | {"engine": dict(cal.engine)},
            "profile": profile.to_dict(), "cold_start_s": cold, "cold_starts_s": live.cold_starts_s,
            "grown_at_s": live.grown_at_s, "shrunk_at_s": live.shrunk_at_s, "load_s": live.load_s,
            "step_s": [cal.base_s, cal.base_s + cal.peak_s],
            "ttft_p90_error": ttft["error"], "within_tolerance": ttft["error"] is not None
            and abs(ttft["error"]) <= TOLERANCE, "results": rows,
            "live_samples": live.samples, "sim_events": sim.events,
            "live_requests": [{"arrival": a, "ttft": r.ttft, "e2e": r.e2e, "output_tokens": r.output_tokens,
                               "error": r.error} for a, r in live.requests]}


def report(payload: dict) -> str:
    rows = [dict(r, error=None if r["error"] is None else f"{r['error'] * 100:+.1f}%") for r in payload["results"]]
    grown, shrunk, (step, end) = payload["grown_at_s"], payload["shrunk_at_s"], payload["step_s"]
    verdict = "within" if payload["within_tolerance"] else "NOT within"
    return "\n".join([
        format_table(rows, ("figure", "live", "simulated", "error"),
                     title=f"calibration: live {payload['settings']['model']} pool "
                           f"(min {payload['settings']['min_replicas']}, max {payload['settings']['max_replicas']}, "
                           f"slo policy) against the simulator on the same requests"),
        f"cold start (decision to serving): {payload['cold_start_s']:.1f} s "
        f"({', '.join(f'{c:.1f}' for c in payload['cold_starts_s']) or 'no replica added'})",
        f"the step: {step:g} s to {end:g} s; the last request ended at {payload['load_s']:.1f} s; the pool grew at "
        + (f"{grown:.1f} s" if grown is not None else "no time (it never grew)") + ", was back at its minimum at "
        + (f"{shrunk:.1f} s" if shrunk is not None else f"no time within {payload['settings']['settle_s']:g} s"),
        f"simulated TTFT p90 {verdict} {TOLERANCE * 100:.0f} % of the live one"])


def run_from_args(args: argparse.Namespace) -> dict:
    import ray

    cal = Calibration(**{k: getattr(args, k) for k in Calibration.__dataclass_fields__ if k != "engine"})
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=args.address, num_cpus=None if args.address else args.ray_cpus,
                 include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-profile-") as tmp:
            if args.profile:
                profile_path, profile = args.profile, Profile.load(args.profile)
            else:
                profile = measure_profile(cal.model, cal.engine, args.tokenizer)
                profile_path = str(Path(tmp) / "profile.json")
                profile.save(profile_path)
            payload = asyncio.run(calibrate(cal, profile, profile_path, args.tokenizer))
    finally:
        if own_ray:
            ray.shutdown()
    print(report(payload))
    write_json(args.result_file, payload)
    return payload
