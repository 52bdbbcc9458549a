"""``shoal serve``: an OpenAI-compatible router in front of N engine worker processes, on one machine.

The workers are ``python -m shoal.workers.server`` children speaking gRPC on 127.0.0.1 (the cluster
path runs the same server in Ray actors); the router is a :class:`~shoal.router.host.RouterHost` in
this process. The order of things:

1. check the arguments and the model, bind the router's port (a taken port fails here, before any
   model loads), load the tokenizer;
2. start the workers and wait until each is ready (in parallel);
3. start the router host: it listens, starts the app and returns once a worker is healthy; only then
   the ``ready on http://…/v1`` line is printed (and ``/ready`` answers 200);
4. serve: a :class:`~shoal.cluster.supervisor.WorkerSupervisor` restarts a worker process that dies;
5. on SIGTERM / Ctrl-C: drain (``/ready`` 503, new requests 503, in-flight ones get
   ``--drain-timeout`` seconds, the rest end with an error event), then stop the workers; exit 0.
   A second Ctrl-C skips the wait.

Every worker gets the ``--kv-*`` settings (only prefill and decode workers use them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from shoal.router.host import RouterHost, StartupError, bind_socket
from shoal.workers.models.files import check_model, tokenizer_path

from .flags import api_key, router_config, worker_flags
from .supervisor import WorkerSupervisor
from .worker_process import WorkerProcess, WorkerStartError

__all__ = ["bind_socket", "make_workers", "run_loop", "serve", "worker_roles"]


def worker_roles(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(worker id, role) of each worker: ``--workers`` unified ones, or with ``--prefill-workers N``
    that many prefill workers and ``--workers`` decode ones (disaggregated serving)."""
    if args.prefill_workers < 0:
        raise ValueError(f"--prefill-workers must be >= 0, got {args.prefill_workers}")
    if not args.prefill_workers:
        return [(f"worker-{i}", "unified") for i in range(args.workers)]
    return ([(f"prefill-{i}", "prefill") for i in range(args.prefill_workers)]
            + [(f"decode-{i}", "decode") for i in range(args.workers)])


def _visible_gpus(args: argparse.Namespace) -> list[str]:
    """The GPU ids this process may hand out; refuses ``--device cuda`` where there is none."""
    if args.device == "cpu":
        return []
    import torch  # the workers need it anyway; the router side of this process does not

    if not torch.cuda.is_available():
        if args.device == "auto":
            return []
        raise ValueError(f"--device {args.device}: no CUDA device is available on this machine")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def gpu_assignment(args: argparse.Namespace, num_workers: int) -> list[dict[str, str]]:
    """Per worker, the environment that gives it GPUs of its own when there are enough
    (``tensor_parallel_size`` each, in order); otherwise nothing (they share what they see)."""
    ids = _visible_gpus(args)
    if args.device not in ("auto", "cuda"):
        return [{}] * num_workers  # cpu, or an explicit cuda:N for all of them
    per = args.tensor_parallel_size
    if num_workers < 2 or len(ids) < num_workers * per:
        return [{}] * num_workers
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per:(i + 1) * per])} for i in range(num_workers)]


def make_workers(args: argparse.Namespace) -> list[WorkerProcess]:
    """The worker processes ``args`` asks for, not started yet."""
    flags = worker_flags(args)
    roles = worker_roles(args)
    envs = gpu_assignment(args, len(roles))
    return [WorkerProcess(wid, flags, role=role, env=env) for (wid, role), env in zip(roles, envs)]


def start_workers(workers: list[WorkerProcess], timeout_s: float) -> None:
    """Start every worker and wait until all are ready (they load in parallel); on a failure stop them
    all and raise the first :class:`WorkerStartError`."""
    for w in workers:
        w.start()
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.wait_ready(timeout_s), workers))
    except BaseException:
        stop_workers(workers)
        raise


def stop_workers(workers: list[WorkerProcess]) -> None:
    with ThreadPoolExecutor(max(len(workers), 1)) as pool:
        list(pool.map(lambda w: w.stop(), workers))


def _roles_line(roles: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for _, role in roles:
        counts[role] = counts.get(role, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in counts.items())


def _router_config(args: argparse.Namespace):
    """Generated from RouterConfig's declaration (cluster/flags.py); the API key may also come from
    ``SHOAL_API_KEY``, so it need not show in the process list."""
    return router_config(args, api_key=api_key(args, os.environ))


def _check(args: argparse.Namespace) -> str:
    """Everything that can be refused before a process starts; -> the tokenizer path."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.hang_timeout < 0:
        raise ValueError(f"--hang-timeout must be >= 0, got {args.hang_timeout}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    worker_flags(args)  # refuse a bad engine or --kv-* value
    check_model(args.model)
    tok_path = args.tokenizer or tokenizer_path(args.model)
    if tok_path is None:
        raise ValueError(f"--model {args.model} has no tokenizer of its own (a shape preset or a weights-only "
                         "directory); pass --tokenizer PATH")
    return str(tok_path)


def serve(args: argparse.Namespace) -> int:
    from shoal.workers.tokenizer import Tokenizer

    tok_path = _check(args)
    config = _router_config(args)
    sock = bind_socket(args.host, args.port)  # a taken port fails now, before any model loads
    try:
        tokenizer = Tokenizer.from_path(tok_path)
        workers = make_workers(args)
        print(f"shoal serve: starting {_roles_line(worker_roles(args))} worker(s) for {args.model} ...", flush=True)
        try:
            start_workers(workers, args.worker_start_timeout)
        except WorkerStartError as e:
            raise StartupError(e.summary) from None
    except BaseException:
        sock.close()
        raise
    try:
        return run_loop(_serve(args, config, tokenizer, workers, sock))
    finally:
        stop_workers(workers)
        print("shoal serve: stopped", file=sys.stderr, flush=True)


def run_loop(coro) -> int:
    """Run on uvloop when it is installed (what uvicorn itself would pick)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _serve(args: argparse.Namespace, config, tokenizer, workers: list[WorkerProcess], sock) -> int:
    from shoal.router.app import create_app
    from shoal.router.worker_client import GrpcWorkerClient
    from shoal.router.worker_pool import make_pool

    pool = make_pool(config)
    for w in workers:
        pool.add(GrpcWorkerClient(w.worker_id, w.endpoint))
    host = RouterHost(create_app(config, pool, tokenizer), sock=sock, drain_timeout_s=args.drain_timeout)
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second Ctrl-C: do not wait for in-flight requests
            host.drain_timeout_s = 0.0
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await host.start(ready_timeout_s=args.worker_start_timeout)
    print(f"shoal serve: ready on {host.url}/v1 (model {config.served_model_name!r}, "
          f"{_roles_line(worker_roles(args))} worker(s), placement {args.placement})", flush=True)
    supervisor = WorkerSupervisor(workers, pool, GrpcWorkerClient, start_timeout_s=args.worker_start_timeout,
                                  hang_timeout_s=args.hang_timeout or None,
                                  say=lambda line: print(line, file=sys.stderr, flush=True)).start()
    stopping = asyncio.ensure_future(stop.wait())
    exited = asyncio.ensure_future(host.wait())
    await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await supervisor.stop()
    cut = await host.stop()
    if cut:
        print(f"shoal serve: {cut} request(s) still running after --drain-timeout {args.drain_timeout:g} s "
              "were ended with an error", file=sys.stderr, flush=True)
    return 0
