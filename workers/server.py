"""The worker's gRPC service over an ``AsyncEngine``, and ``python -m shoal.workers.server``.

The servicer only touches the ``AsyncEngine``'s thread-safe surface, so RPCs stay responsive while
the engine thread steps. Every stream it serves ends: with the engine's last delta, with
INVALID_ARGUMENT for a refused request, or with UNAVAILABLE when the engine loop dies or the server
shuts down (a watchdog polls ``AsyncEngine.alive()`` while a stream waits). A client that cancels
its Generate call aborts the request on the engine (leaving ``AsyncEngine.generate`` runs its
``finally``), so a gone router never leaves a generation running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import AsyncIterator

import grpc

from shoal.cluster.cli import add_engine_args, engine_kwargs
from shoal.workers.async_engine import AsyncEngine
from shoal.workers.disagg_config import DisaggConfig, add_kv_transfer_args, kv_transfer_options
from shoal.workers.rpc import codec
from shoal.workers.rpc import worker_pb2 as pb
from shoal.workers.rpc import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # a KV snapshot of a large cache is ~18 bytes a block
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Accept the clients' keepalive pings (grpc's default strikes them out after 2 in 5 minutes) ...
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    # ... and ping them: a router whose host vanished gets its calls cancelled, so their requests abort.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


class _Unavailable(Exception):
    """A stream cannot go on: the engine loop died or the server is shutting down."""


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, watchdog_s: float = 1.0):
        self.engine = engine
        self._watchdog_s = watchdog_s
        self._closing = asyncio.Event()

    def begin_shutdown(self) -> None:
        """End the KV event streams (they never finish on their own) so a graceful stop need not wait."""
        self._closing.set()

    # -- streams --------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._require_alive(context)
        try:
            req = codec.generate_request_from_pb(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deltas = self.engine.generate(req)
        first = True
        try:
            while True:
                try:
                    delta = await self._next(deltas)
                except StopAsyncIteration:
                    return
                except ValueError as e:
                    if not first:  # only validation (before the first delta) is the caller's fault
                        raise
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                first = False
                await context.write(codec.token_delta_to_pb(delta))
                if delta.finish_reason is not None:
                    return
        except _Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            await deltas.aclose()  # not finished: AsyncEngine.generate's finally aborts the request

    async def KVEvents(self, request: pb.KVEventsRequest, context: grpc.aio.ServicerContext) -> None:
        await self._require_alive(context)
        try:
            sub = self.engine.subscribe_kv_events()
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        try:
            while True:
                try:
                    batch = await self._next(sub, interruptible=True)
                except StopAsyncIteration:  # the engine ended every subscription: it shut down
                    raise _Unavailable("engine shut down") from None
                await context.write(codec.kv_event_batch_to_pb(batch))
        except _Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            sub.close()

    # -- unary ----------------------------------------------------------------------------------
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        self.engine.abort(request.request_id)
        return pb.AbortReply()

    # -- disaggregated serving ------------------------------------------------------------------
    async def Prefill(self, request: pb.GenerateRequest, context) -> pb.KVHandle:
        await self._require_alive(context)
        try:
            req = codec.generate_request_from_pb(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prefill = asyncio.ensure_future(self.engine.prefill(req))
        try:
            handle = await self._next_of(prefill)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except _Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return codec.kv_handle_to_pb(handle)

    async def OpenKVLink(self, request: pb.OpenKVLinkRequest, context) -> pb.OpenKVLinkReply:
        from shoal.workers.disagg import geometry_from_pb

        try:
            return self.engine.prefill_side.open_link(request.link_id, geometry_from_pb(request.geometry))
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def PullKV(self, request: pb.PullKVRequest, context) -> pb.PullKVReply:
        try:
            sent, chunking = await self.engine.prefill_side.pull(
                request.request_id, request.link_id, list(request.block_indices), request.tag,
                request.layers_per_chunk)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}")
        return pb.PullKVReply(num_sent=sent, layers_per_chunk=chunking)

    async def CloseKVLink(self, request: pb.CloseKVLinkRequest, context) -> pb.Empty:
        self.engine.close_kv_link(request.link_id)
        return pb.Empty()

    async def GetLoad(self, request: pb.Empty, context) -> pb.WorkerLoad:
        return codec.worker_load_to_pb(self.engine.load())

    async def GetInfo(self, request: pb.Empty, context) -> pb.WorkerInfo:
        return codec.worker_info_to_pb(self.engine.info())

    async def Health(self, request: pb.Empty, context) -> pb.HealthReply:
        alive = self.engine.alive()
        status = pb.HealthReply.SERVING if alive else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, last_error=self._engine_error(alive))

    # -- helpers --------------------------------------------------------------------------------
    def _engine_error(self, alive: bool) -> str:
        if alive:
            return self.engine.last_error or ""
        return f"engine loop is not running (last error: {self.engine.last_error or 'none'})"

    async def _require_alive(self, context) -> None:
        # A command sent to a dead loop is never answered: refuse instead of hanging the caller.
        if not self.engine.alive():
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._engine_error(False))

    async def _next_of(self, task: asyncio.Future):
        """``await task``, but raises ``_Unavailable`` if the engine dies first (the task is cancelled)."""
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._watchdog_s)
                if done:
                    return task.result()
                if not self.engine.alive():
                    raise _Unavailable(self._engine_error(False))
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    async def _next(self, it: AsyncIterator, interruptible: bool = False):
        """``anext(it)``, but raises ``_Unavailable`` if the engine dies (or, when ``interruptible``,
        the server begins shutting down) first. Leaving early cancels the pending ``anext``."""
        step = asyncio.ensure_future(anext(it))
        waits = {step}
        if interruptible:
            waits.add(asyncio.ensure_future(self._closing.wait()))
        try:
            while True:
                done, _ = await asyncio.wait(waits, timeout=self._watchdog_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if step in done:
                    return step.result()
                if done:
                    raise _Unavailable("worker is shutting down")
                if not self.engine.alive():
                    raise _Unavailable(self._engine_error(False))
        finally:
            for task in waits:
                task.cancel()
            await asyncio.wait(waits)


async def start_worker_server(engine: AsyncEngine, host: str, port: int, *,
                              servicer: WorkerServicer | None = None) -> grpc.aio.Server:
    """Serve ``engine`` on ``host:port`` (port 0: a free port) and return the started server.

    The port actually bound is ``server.bound_port``. Stop it with ``await server.stop(grace)``
    (call ``servicer.begin_shutdown()`` first to end KV event streams at once).
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_WorkerServicer_to_server(servicer or WorkerServicer(engine), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)  # raises RuntimeError if it cannot bind
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    server.bound_port = bound
    if not engine.endpoint:  # what a KVHandle names for decode workers to pull from
        engine.endpoint = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    return server


# -- the worker process ---------------------------------------------------------------------------
async def serve(engine: AsyncEngine, host: str, port: int, grace_s: float) -> None:
    """Serve until SIGTERM/SIGINT; print ``READY host:port`` once listening (a parent waits for it)."""
    servicer = WorkerServicer(engine)
    server = await start_worker_server(engine, host, port, servicer=servicer)
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
    stopped.cancel()
    terminated.cancel()


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
    add_engine_args(p)
    add_kv_transfer_args(p)
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
    return build_engine(args.model, engine_kwargs(args), worker_id=args.worker_id or f"worker-{args.port}",
                        role=args.role, kv_transfer=kv_transfer_options(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until the loop installs its own handlers, a signal (while the model loads) just ends the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    engine = None
    try:
        engine = engine_from_args(args)
        asyncio.run(serve(engine, args.host, args.port, args.grace_s))
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
