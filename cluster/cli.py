"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from .flags import add_engine_args, add_etcd_arg, add_kv_transfer_args, add_router_args, engine_kwargs

# RouterConfig fields a deployment's spec sets for all its routers: `shoal router` has no flag for them.
SPEC_OWNED = ("placement", "disagg_min_prefill_tokens", "tool_call_parser", "chat_template")


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:
        return "unknown"


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args)


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import launch

    return launch(args)


def cmd_router(args: argparse.Namespace) -> int:
    from .router_process import router_main

    return router_main(args)


def cmd_status(args: argparse.Namespace) -> int:
    from .launch import status

    return status(args)


def cmd_stop(args: argparse.Namespace) -> int:
    from .launch import stop

    return stop(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from shoal.workers import LLM, SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed, stop=args.stop or ())
    llm = LLM(args.model, **engine_kwargs(args))
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}]), add_special_tokens=False)
    else:
        print(prompt, end="", flush=True)
    for delta in llm.stream(prompt, params):
        print(delta, end="", flush=True)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="shoal: a distributed LLM serving cluster")
    parser.add_argument("--version", action="version", version=f"shoal {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal",
                         description="Load a model in this process and stream a completion of PROMPT.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve", help="serve a model over the OpenAI API: a router and N worker processes on this machine",
        description="Start N engine workers (one process each, gRPC on 127.0.0.1) and an OpenAI-compatible "
                    "router in front of them. Stops everything on Ctrl-C / SIGTERM.")
    srv.add_argument("--host", default="127.0.0.1", help="router address (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000, help="router port; 0 picks a free one (default: %(default)s)")
    srv.add_argument("--workers", type=int, default=1, help="engine worker processes (default: %(default)s); "
                     "with --prefill-workers, the decode workers")
    srv.add_argument("--prefill-workers", type=int, default=0,
                     help="disaggregated serving: this many prefill workers hand prompts' KV blocks to the "
                          "--workers decode workers (default: %(default)s: none, unified workers)")
    srv.add_argument("--worker-start-timeout", type=float, default=600.0, help="seconds a worker may take to load")
    srv.add_argument("--hang-timeout", type=float, default=60.0,
                     help="a worker that answers no health check for this many seconds is killed and restarted; "
                          "0: never (default: %(default)s)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM / Ctrl-C, seconds in-flight requests may take to finish before they are "
                          "ended with an error (default: %(default)s)")
    add_engine_args(srv)
    add_kv_transfer_args(srv)  # the workers' own --kv-* flags
    add_router_args(srv)
    srv.set_defaults(func=cmd_serve)

    lch = sub.add_parser(
        "launch", help="start a deployment on a Ray cluster and watch it until Ctrl-C / SIGTERM / shoal stop",
        description="Start the spec's worker replicas as Ray placement groups + actors, and router.replicas "
                    "routers fed by etcd membership (one in this process, the others as Ray actors on other "
                    "nodes); restart dead workers and router actors; stop everything on exit. "
                    "Works as a Ray job: ray job submit --working-dir . -- shoal launch -f deploy.yaml")
    lch.add_argument("-f", "--file", required=True, help="deployment spec (.yaml, .yml or .json)")
    lch.add_argument("--address", default=None, help="Ray address: auto, ray://host:10001 or host:port "
                                                     "(default: $RAY_ADDRESS, else auto)")
    lch.add_argument("--connect-timeout", type=float, default=120.0, metavar="SECONDS",
                     help="how long to keep retrying a ray:// address that refuses the connection "
                          "(default: %(default)s)")
    add_etcd_arg(lch, default_help="the spec's; an embedded etcd when that is the default and none answers")
    lch.add_argument("--host", default="0.0.0.0", help="every router's bind address on its node "
                                                       "(default: %(default)s)")
    lch.add_argument("--port", type=int, default=None, help="every router's port on its node; 0: each picks "
                                                            "a free one (default: the spec's router.port)")
    lch.add_argument("--host-ip", default=None, help="this node's IP as others reach it (default: Ray's)")
    lch.add_argument("--lease-ttl", type=int, default=10,
                     help="worker and router etcd lease TTL in s (default: %(default)s)")
    lch.add_argument("--check-interval", type=float, default=1.0,
                     help="seconds between checks of worker and router actors")
    lch.add_argument("--start-timeout", type=float, default=600.0, help="seconds a replica may take to start")
    lch.add_argument("--hang-timeout", type=float, default=60.0,
                     help="seconds a started replica may leave every health ping unanswered before it is "
                          "killed and restarted (default: %(default)s)")
    lch.add_argument("--autoscale-interval", type=float, default=5.0, metavar="SECONDS",
                     help="seconds between autoscaling decisions for the pools the spec's autoscaling block "
                          "names (the others keep their replicas) (default: %(default)s)")
    lch.add_argument("--autoscale-window", type=float, default=30.0, metavar="SECONDS",
                     help="seconds of worker load reports the arrival rate and request mix are taken over "
                          "(default: %(default)s)")
    lch.add_argument("--no-routers", dest="routers", action="store_false",
                     help="start and watch the workers only; the routers run apart (`shoal router`, e.g. a "
                          "Kubernetes Deployment)")
    lch.add_argument("--takeover-wait", type=float, default=0.0, metavar="SECONDS",
                     help="when workers of this deployment are still registered (a launcher that died: its "
                          "actors die with it and their leases run out), wait up to this long for them to go "
                          "before refusing to start (default: %(default)s: refuse at once)")
    lch.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    lch.set_defaults(func=cmd_launch)

    rtr = sub.add_parser(
        "router", help="serve the OpenAI API for a launched deployment, its workers found through etcd",
        description="One router replica, no Ray and no GPU: reads the deployment's spec from etcd (put there "
                    "by `shoal launch`), follows its worker membership, serves once a worker is healthy "
                    "(/health: alive, /ready: can serve), registers itself, drains on SIGTERM.")
    add_etcd_arg(rtr, required=True)
    rtr.add_argument("--deployment", required=True, help="the deployment's name (the spec's name)")
    rtr.add_argument("--prefix", default="/shoal", help="etcd key prefix (default: %(default)s)")
    rtr.add_argument("--host", default="0.0.0.0", help="bind address (default: %(default)s)")
    rtr.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    rtr.add_argument("--advertise-host", default=None,
                     help="the host the registered URL names when binding a wildcard (default: the hostname)")
    rtr.add_argument("--router-id", default=None, help="its etcd registration id (default: the hostname)")
    rtr.add_argument("--tokenizer", default=None, help="tokenizer path (default: the spec's, else the model's)")
    rtr.add_argument("--lease-ttl", type=int, default=10, help="etcd lease TTL in s (default: %(default)s)")
    rtr.add_argument("--ready-timeout", type=float, default=600.0,
                     help="seconds to wait for etcd, the spec and a healthy worker (default: %(default)s)")
    rtr.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds in-flight requests may take to finish (default: %(default)s)")
    add_router_args(rtr, skip=SPEC_OWNED)
    rtr.set_defaults(func=cmd_router)

    for name, func, help_text in (("status", cmd_status, "list deployments, their workers and routers from etcd"),
                                  ("stop", cmd_stop, "stop a launched deployment (its shoal launch drains "
                                                     "and removes it)")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "stop":
            p.add_argument("name", help="the deployment's name")
            p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for it to go")
        add_etcd_arg(p, default="127.0.0.1:2379")
        p.add_argument("--prefix", default="/shoal", help="etcd key prefix (default: %(default)s)")
        p.set_defaults(func=func)

    bench = sub.add_parser("bench", help="benchmarks: each prints a table and writes JSON",
                           description="Benchmarks. Each prints a table, writes --result-file JSON and "
                                       "measures the device ceilings it compares against in the same run.")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module, help_text in BENCHMARKS:
        b = bench_sub.add_parser(name, help=help_text, description=help_text)
        _bench_module(module).add_arguments(b)
        b.set_defaults(func=lambda a, m=module: (_bench_module(m).run_from_args(a), 0)[1])
    return parser


BENCHMARKS = [
    ("throughput", "throughput", "offline generation throughput vs HF transformers generate_batch"),
    ("latency", "latency", "batch-1 decode step time against the memory roofline"),
    ("kernels", "kernels", "Triton kernels in GB/s and TFLOP/s beside copy bandwidth and matmul peak"),
    ("serve", "serve", "load generator for any OpenAI-compatible server: TTFT, TPOT, ITL, throughput"),
    ("router", "router", "time the router adds between client and worker, both ways, at concurrency 1"),
    ("kv-transfer", "kv_transfer", "KV block transfer bandwidth between two devices beside the send/recv ceiling"),
    ("profile", "profile", "measure a worker's prefill and decode step times: the autoscaling profile"),
    ("autoscale", "autoscale", "simulate autoscaling policies on traces: SLO attainment against replica-hours"),
    ("calibrate", "calibrate", "a live autoscaled deployment under a load step against the simulator's replay"),
]


def _bench_module(name: str):
    import importlib

    return importlib.import_module(f"shoal.cluster.bench.{name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad input: one clear line, not a traceback
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
