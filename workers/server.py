"""``python -m shoal.workers.server``: one worker process — flags, the engine, the gRPC server, signals.

The gRPC service itself (``WorkerServicer``, ``start_worker_server``) is ``workers/rpc/servicer.py``;
it is re-exported here for callers that start a worker in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys

from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.disagg_config import DisaggConfig
from shoal.workers.options import add_arguments, from_namespace
from shoal.workers.rpc.servicer import WorkerServicer, start_worker_server  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


# -- the worker process ---------------------------------------------------------------------------
async def serve(engine: AsyncEngine, host: str, port: int, grace_s: float, metrics_port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT; print ``READY host:port`` once listening (a parent waits for it).
    ``metrics_port``: also serve the engine's Prometheus series over plain HTTP (``/metrics``) there."""
    servicer = WorkerServicer(engine)
    server = await start_worker_server(engine, host, port, servicer=servicer)
    if metrics_port is not None:
        metrics_http = start_metrics_http(engine, host, metrics_port)
        log.info("metrics on http://%s:%d/metrics", host, metrics_http.server_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {host}:{server.bound_port}", flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    terminated = asyncio.ensure_future(server.wait_for_termination())
    await asyncio.wait({stopped, terminated}, return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping: in-flight requests get %.1f s to finish", grace_s)
    servicer.begin_shutdown()
    await server.stop(grace_s)
    await engine.close_kv_peers()
    if metrics_port is not None:
        metrics_http.shutdown()
        metrics_http.server_close()
    stopped.cancel()
    terminated.cancel()


def start_metrics_http(engine: AsyncEngine, host: str, port: int):
    """prometheus_client's own HTTP server for the engine's registry (a Kubernetes PodMonitor scrapes
    it); -> the started server (``server_port``: the port bound; ``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=engine.metrics.registry)
    except OSError as e:
        raise ValueError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return server


def _die_with(parent_pid: int) -> bool:
    """Get SIGTERM when ``parent_pid`` (our parent) dies; False if it has died already."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent_pid  # checked after prctl: a parent dying in between is still seen


class _Interrupted(Exception):
    pass


def _interrupt(signum, frame) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shoal.workers.server",
                                description="Serve one engine over gRPC (the worker side of shoal).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port (see the READY line)")
    p.add_argument("--worker-id", default=None, help="default: worker-<port>")
    p.add_argument("--role", default="unified", choices=["unified", "prefill", "decode"])
    p.add_argument("--grace-s", type=float, default=5.0, help="on SIGTERM, how long in-flight requests may run")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve Prometheus /metrics over plain HTTP on this port (0: a free one; default: off)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit (SIGTERM) when this process dies, even by SIGKILL: a supervisor's pid (Linux)")
    add_arguments(p.add_argument_group("engine"), EngineConfig)  # the flags shoal serve passes on
    add_arguments(p.add_argument_group("KV transfer (disaggregated prefill/decode)"), DisaggConfig)
    return p


def build_engine(model: str, engine_options: dict, *, worker_id: str, role: str,
                 kv_transfer: dict | None = None) -> AsyncEngine:
    """A started engine for a worker (this server's ``main`` and the Ray ``WorkerActor`` alike). KV
    events are always on: the routers' prefix index subscribes to them. ``kv_transfer``: DisaggConfig
    fields; the others keep their defaults."""
    from shoal.workers.config import EngineConfig
    from shoal.workers.llm_engine import LLMEngine

    llm = LLMEngine(EngineConfig(model=model, **{**engine_options, "kv_events": True}))
    disagg = DisaggConfig(**(kv_transfer or {}))
    return AsyncEngine(llm, worker_id=worker_id, role=role, disagg=disagg).start()


def engine_from_args(args: argparse.Namespace) -> AsyncEngine:
    """The engine :func:`main` serves, from its parsed flags."""
    config, disagg = from_namespace(EngineConfig, args), from_namespace(DisaggConfig, args)
    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
    return build_engine(config.model, options, worker_id=args.worker_id or f"worker-{args.port}",
                        role=args.role, kv_transfer=dataclasses.asdict(disagg))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until the loop installs its own handlers, a signal (while the model loads) just ends the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    if args.parent_pid is not None and not _die_with(args.parent_pid):
        return 0  # the parent is already gone: nobody will use this worker
    engine = None
    try:
        engine = engine_from_args(args)
        asyncio.run(serve(engine, args.host, args.port, args.grace_s, args.metrics_port))
    except ValueError as e:  # bad configuration: one clear line, not a traceback
        print(f"shoal worker: error: {e}", file=sys.stderr)
        return 2
    except _Interrupted as e:
        log.info("interrupted by %s before serving", e)
    finally:
        if engine is not None:
            engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
