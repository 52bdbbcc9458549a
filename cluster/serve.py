"""``shoal serve``: an OpenAI-compatible router in front of N engine worker processes, on one machine.

The workers are ``python -m shoal.workers.server`` children speaking gRPC on 127.0.0.1 (the cluster
path runs the same server in Ray actors); the router runs in this process under uvicorn. Ctrl-C or
SIGTERM stops the router first (in-flight requests end), then the workers. Every worker gets the ``--kv-*`` settings (only prefill and decode
workers use them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from .cli import engine_flags
from shoal.workers.disagg_config import kv_transfer_flags, kv_transfer_options

from .worker_process import WorkerProcess, WorkerStartError


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the router's socket here, so ``--port 0`` works and the printed URL is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on only for such sockets, and without it a stream's
    # first chunk waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def worker_roles(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(worker id, role) of each worker: ``--workers`` unified ones, or with ``--prefill-workers N``
    that many prefill workers and ``--workers`` decode ones (disaggregated serving)."""
    if args.prefill_workers < 0:
        raise ValueError(f"--prefill-workers must be >= 0, got {args.prefill_workers}")
    if not args.prefill_workers:
        return [(f"worker-{i}", "unified") for i in range(args.workers)]
    return ([(f"prefill-{i}", "prefill") for i in range(args.prefill_workers)]
            + [(f"decode-{i}", "decode") for i in range(args.workers)])


def gpu_assignment(args: argparse.Namespace, num_workers: int) -> list[dict[str, str]]:
    """Per worker, the environment that gives it GPUs of its own when there are enough
    (``tensor_parallel_size`` each, in order); otherwise nothing (they share what they see)."""
    if args.device not in ("auto", "cuda"):
        return [{}] * num_workers  # cpu, or an explicit cuda:N for all of them
    import torch

    per = args.tensor_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if num_workers < 2 or len(ids) < num_workers * per:
        return [{}] * num_workers
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per:(i + 1) * per])} for i in range(num_workers)]


def make_workers(args: argparse.Namespace) -> list[WorkerProcess]:
    """The worker processes ``args`` asks for, not started yet."""
    flags = engine_flags(args) + kv_transfer_flags(kv_transfer_options(args))
    roles = worker_roles(args)
    envs = gpu_assignment(args, len(roles))
    return [WorkerProcess(wid, flags, role=role, env=env) for (wid, role), env in zip(roles, envs)]


def start_workers(args: argparse.Namespace) -> list[WorkerProcess]:
    workers = make_workers(args)
    for w in workers:
        w.start()
    try:
        with ThreadPoolExecutor(len(workers)) as pool:  # load in parallel
            list(pool.map(lambda w: w.wait_ready(args.worker_start_timeout), workers))
    except WorkerStartError:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: list[WorkerProcess]) -> None:
    with ThreadPoolExecutor(max(len(workers), 1)) as pool:
        list(pool.map(lambda w: w.stop(), workers))


def _count_roles(roles: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, role in roles:
        counts[role] = counts.get(role, 0) + 1
    return counts


def _router_server(app):
    import uvicorn

    class RouterServer(uvicorn.Server):
        # uvicorn re-raises a captured SIGTERM after shutting down, which would kill this process
        # before it stops the workers; serve() handles the signals itself instead.
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    server = RouterServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))

    def on_signal(signum, frame):
        if server.should_exit:  # a second Ctrl-C: stop waiting for in-flight requests
            server.force_exit = True
        server.should_exit = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return server


def serve(args: argparse.Namespace) -> int:
    from shoal.router.app import create_app
    from shoal.router.config import RouterConfig
    from shoal.router.worker_client import GrpcWorkerClient
    from shoal.router.worker_pool import make_pool
    from shoal.workers.models.loader import tokenizer_path
    from shoal.workers.tokenizer import Tokenizer

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    kv_transfer_options(args)  # refuse a bad --kv-* value before anything starts
    tok_path = args.tokenizer or tokenizer_path(args.model)
    if tok_path is None:
        raise ValueError(f"model {args.model!r} has no tokenizer; pass --tokenizer PATH")
    tokenizer = Tokenizer.from_path(tok_path)
    config = RouterConfig(
        served_model_name=args.served_model_name or args.model, placement=args.policy,
        placement_options={"block_size": args.block_size} if args.policy == "prefix_aware" else {},
        max_concurrent_requests=args.max_concurrent_requests, max_waiting_requests=args.max_waiting_requests,
        disagg_min_prefill_tokens=args.disagg_min_prefill_tokens)
    sock = bind_socket(args.host, args.port)
    roles = ", ".join(f"{n} {r}" for r, n in _count_roles(worker_roles(args)).items())
    print(f"shoal serve: starting {roles} worker(s) for {args.model} ...", flush=True)
    workers = start_workers(args)
    try:
        pool = make_pool(config)
        for w in workers:
            pool.add(GrpcWorkerClient(w.worker_id, w.endpoint))
        server = _router_server(create_app(config, pool, tokenizer))  # signal handlers from here on
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"shoal serve: ready on http://{shown}:{port}/v1 (model {config.served_model_name!r}, "
              f"{roles} worker(s), placement {args.policy})", flush=True)
        server.run(sockets=[sock])
    finally:
        stop_workers(workers)
        sock.close()
        print("shoal serve: stopped", file=sys.stderr, flush=True)
    return 0
