"""The worker's gRPC service (``WorkerServicer``) over an ``AsyncEngine``, and the server that hosts it.

The servicer only touches the ``AsyncEngine``'s thread-safe surface, so RPCs stay responsive while
the engine thread steps. Every stream it serves ends: with the engine's last delta, with
INVALID_ARGUMENT for a refused request, or with UNAVAILABLE when the engine loop dies or the server
shuts down (a watchdog polls ``AsyncEngine.alive()`` while a stream waits). A client that cancels
its Generate call aborts the request on the engine (leaving ``AsyncEngine.generate`` runs its
``finally``), so a gone router never leaves a generation running.

This module imports no torch (the engine arrives built): only ``AsyncEngine``'s type is named.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator

import grpc

from . import codec
from . import worker_pb2 as pb
from . import worker_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from shoal.workers.async_engine import AsyncEngine

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


async def _refuse(context, error: ValueError) -> None:
    """INVALID_ARGUMENT: the request is at fault (never the worker). An ``InvalidParam``'s field goes
    along as trailing metadata, so the router's 400 names it as data."""
    field = getattr(error, "field", None)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error),
                        trailing_metadata=((codec.INVALID_PARAM_KEY, field),) if field else ())


class _Unavailable(Exception):
    """A stream cannot go on: the engine loop died or the server is shutting down."""


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, engine: "AsyncEngine", watchdog_s: float = 1.0):
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
            await _refuse(context, e)
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
                    await _refuse(context, e)
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
            await _refuse(context, e)
        prefill = asyncio.ensure_future(self.engine.prefill(req))
        try:
            handle = await self._next_of(prefill)
        except ValueError as e:
            await _refuse(context, e)
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except _Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return codec.kv_handle_to_pb(handle)

    async def OpenKVLink(self, request: pb.OpenKVLinkRequest, context) -> pb.OpenKVLinkReply:
        try:
            return self.engine.prefill_side.open_link(request.link_id, request.geometry)
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
            await _refuse(context, e)
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

    async def GetMetrics(self, request: pb.Empty, context) -> pb.MetricsText:
        # off the loop: rendering waits (bounded) for the engine thread to refresh between steps
        text = await asyncio.to_thread(self.engine.metrics.render)
        return pb.MetricsText(text=text.decode())

    async def Health(self, request: pb.Empty, context) -> pb.HealthReply:
        alive = self.engine.alive()
        status = pb.HealthReply.SERVING if alive else pb.HealthReply.NOT_SERVING
        return pb.HealthReply(status=status, last_error=self._engine_error(alive))

    # -- helpers --------------------------------------------------------------------------------
    def _engine_error(self, alive: bool) -> str:
        if alive:
            return self.engine.last_error or ""
        # Not alive: the loop thread ended, or one step has run past the bound (wedged); an idle
        # loop or a long step within the bound is alive (AsyncEngine.alive).
        return f"engine loop is not running or is stuck in a step (last error: {self.engine.last_error or 'none'})"

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


async def start_worker_server(engine: "AsyncEngine", host: str, port: int, *,
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
