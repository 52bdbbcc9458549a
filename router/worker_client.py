"""``GrpcWorkerClient``: the router's handle on one worker process, over gRPC (no torch here).

It has the same methods as the in-process handle, so the router cannot tell them apart, and it turns
every transport failure into one typed error: :class:`WorkerUnavailable`, whose ``started`` says
whether the caller already saw part of the stream (retry elsewhere if not, end the stream with an
error if so). A refused request raises ``ValueError`` (the in-process engine raises the same), for
an HTTP 400. No call can hang: unary calls have a deadline, a stream has a first-token deadline,
and keepalive pings find a worker that vanished mid-stream.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from shoal.workers.protocol import (GenerateRequest, KVEventBatch, KVHandle, TokenDelta, WorkerInfo,
                                    WorkerLoad)
from shoal.workers.engine.sampling_params import InvalidParam
from shoal.workers.rpc import codec
from shoal.workers.rpc import worker_pb2 as pb
from shoal.workers.rpc import worker_pb2_grpc as pb_grpc

from .worker_pool import WorkerUnavailable


def _cancelled_under_us() -> bool:
    """In an ``except CancelledError``: True when nobody cancelled this task, i.e. the call itself was
    cancelled, as closing its channel does (the worker left the pool). The caller then must see a
    worker failure, not a cancellation it would take for its own and never answer its client."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


class GrpcWorkerClient:
    """Async client of one worker's ``shoal.worker.v1.Worker`` service.

    ``connect_timeout_s`` bounds one connection attempt; ``rpc_timeout_s`` is the deadline of unary
    calls; ``first_token_timeout_s`` the time a ``generate`` stream may take to send its first delta
    (queueing plus prefill), and so also the deadline of a ``prefill`` call. The channel opens on
    first use, in the caller's event loop.
    """

    def __init__(self, worker_id: str, endpoint: str, *, connect_timeout_s: float = 5.0,
                 rpc_timeout_s: float = 10.0, first_token_timeout_s: float = 60.0,
                 keepalive_s: float = 10.0):
        for name, value in (("connect_timeout_s", connect_timeout_s), ("rpc_timeout_s", rpc_timeout_s),
                            ("first_token_timeout_s", first_token_timeout_s), ("keepalive_s", keepalive_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self._options = (
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            # One connection attempt may take connect_timeout_s; retry a restarted worker soon after.
            ("grpc.min_reconnect_backoff_ms", int(connect_timeout_s * 1000)),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            # Ping a quiet stream (a long prefill, an idle KV event stream) so a dead peer is noticed.
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_s * 500)),
            ("grpc.http2.max_pings_without_data", 0),
        )
        self.last_health_error = ""  # the reason of the last failed health(), or the engine's last error
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.WorkerStub | None = None

    def __repr__(self) -> str:
        return f"GrpcWorkerClient({self.worker_id!r}, {self.endpoint!r})"

    @property
    def _stub(self) -> pb_grpc.WorkerStub:
        if self._stub_ is None:
            self._channel = grpc.aio.insecure_channel(self.endpoint, options=self._options)
            self._stub_ = pb_grpc.WorkerStub(self._channel)
        return self._stub_

    def _error(self, e: grpc.aio.AioRpcError, started: bool = False) -> Exception:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the request's fault: a 400, never the worker's
            field = dict(e.trailing_metadata() or ()).get(codec.INVALID_PARAM_KEY)
            return InvalidParam(field, e.details()) if field else ValueError(e.details())
        return WorkerUnavailable(self.worker_id, f"{e.code().name}: {e.details()}", code=e.code().name,
                                 started=started)

    def _closed_under_us(self, started: bool = False) -> WorkerUnavailable:
        return WorkerUnavailable(self.worker_id, "its channel was closed (the worker left the pool)",
                                 code="UNAVAILABLE", started=started)

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    # -- the WorkerHandle interface ---------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's deltas; the last has a ``finish_reason``. Leaving the iteration early
        cancels the call, which aborts the request on the worker."""
        call = self._stub.Generate(codec.generate_request_to_pb(req))
        started = False
        try:
            while True:
                msg = await self._read(call, started, self.first_token_timeout_s, "first token")
                if msg is grpc.aio.EOF:
                    raise WorkerUnavailable(self.worker_id, "stream ended without a finish reason",
                                            started=started)
                delta = codec.token_delta_from_pb(msg)
                started = True
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            call.cancel()  # a no-op once the call ended; otherwise tells the worker to abort

    async def prefill(self, req: GenerateRequest) -> KVHandle:
        """Compute the prompt's KV on this (prefill) worker; the handle says where its blocks are
        pinned. Cancelling the await cancels the call, which aborts the prefill on the worker."""
        call = self._stub.Prefill(codec.generate_request_to_pb(req), timeout=self.first_token_timeout_s)
        try:
            reply = await call
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        except asyncio.CancelledError:
            if _cancelled_under_us():
                raise self._closed_under_us() from None
            raise
        finally:
            call.cancel()  # a no-op once the call ended; on our cancellation, tells the worker to abort
        try:
            return codec.kv_handle_from_pb(reply)
        except ValueError as e:  # the worker's reply, not the request, is bad: not the caller's 400
            raise WorkerUnavailable(self.worker_id, f"sent a malformed KV handle: {e}",
                                    code="INTERNAL") from None

    async def _read(self, call, started: bool, first_timeout_s: float, what: str):
        """A stream's next message, the first one under a deadline; transport errors become
        ``WorkerUnavailable`` (``started`` tells the caller whether it may retry elsewhere)."""
        try:
            if started:
                return await call.read()
            async with asyncio.timeout(first_timeout_s):  # never loses a cancellation, unlike 3.11's wait_for
                return await call.read()
        except TimeoutError:
            raise WorkerUnavailable(self.worker_id, f"no {what} within {first_timeout_s} s",
                                    code="DEADLINE_EXCEEDED") from None
        except grpc.aio.AioRpcError as e:
            raise self._error(e, started) from None
        except asyncio.CancelledError:
            if _cancelled_under_us():
                raise self._closed_under_us(started) from None
            raise

    async def abort(self, request_id: str) -> None:
        await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))

    async def get_load(self) -> WorkerLoad:
        return codec.worker_load_from_pb(await self._unary(self._stub.GetLoad, pb.Empty()))

    async def get_info(self) -> WorkerInfo:
        return codec.worker_info_from_pb(await self._unary(self._stub.GetInfo, pb.Empty()))

    async def get_metrics(self) -> str:
        """The worker's Prometheus series as text exposition (``workers/metrics.py``)."""
        return (await self._unary(self._stub.GetMetrics, pb.Empty())).text

    async def health(self) -> bool:
        """True when the worker answers and its engine loop runs; never raises."""
        try:
            reply = await self._unary(self._stub.Health, pb.Empty())
        except WorkerUnavailable as e:
            self.last_health_error = str(e)
            return False
        self.last_health_error = reply.last_error
        return reply.status == pb.HealthReply.SERVING

    async def kv_events(self) -> AsyncIterator[KVEventBatch]:
        """The worker's cached-block changes: a snapshot first, then deltas with consecutive ``seq``.
        Raises ``WorkerUnavailable`` when the worker goes away (resubscribe to get a fresh snapshot)."""
        call = self._stub.KVEvents(pb.KVEventsRequest())
        started = False
        try:
            while True:
                msg = await self._read(call, started, self.rpc_timeout_s, "KV snapshot")
                if msg is grpc.aio.EOF:
                    return
                started = True
                yield codec.kv_event_batch_from_pb(msg)
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_ = None
