"""One generation request's answer: admit it, start it, and answer as JSON or as a stream.

Whatever ends the request (its last event, an error, the deadline, the client leaving, the host's
drain deadline), the generation is finished (its children aborted, its metrics recorded), its
concurrency slot freed and the host stops tracking it, exactly once. A host that drains refuses new
requests here (503). A client that leaves while the request waits for a slot or for its first event is
noticed at once: uvicorn would otherwise let a queued request or a long prefill run for nobody.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .context import RouterContext
from .errors import ApiError
from .generation import Generation
from .responses import ResponseBuilder
from .streaming import SSEResponse, stream_events

T = TypeVar("T")

_CLIENT_GONE = 499  # nobody reads it; the status only reaches the metrics


async def respond(request: Request, ctx: RouterContext, gen: Generation, builder: ResponseBuilder, stream: bool,
                  include_usage: bool) -> Response:
    """Admit, start, and answer: JSON once all choices end, or SSE from the first event on.

    A stream's headers wait for its first event, so an error before any token (bad request on the
    worker, every worker failing) is still a proper status code.
    """
    ctx.check_accepting()
    if not ctx.admission.try_acquire():  # only a request that queues needs a disconnect watch
        try:
            await unless_disconnected(request, ctx.admission.acquire())
        except ClientGone:
            return Response(status_code=_CLIENT_GONE)
    ctx.track(gen)  # the host's drain waits for it, and interrupts it at its deadline
    close = _Once(gen.finish, ctx.admission.release, lambda: ctx.untrack(gen))
    handed_over = False  # to the SSE response, which then closes
    try:
        if not await unless_disconnected(request, ctx.room.wait()):
            raise ctx.unavailable(f"every worker has max_open_per_worker ({ctx.config.max_open_per_worker}) "
                                  f"requests open; none had room within queue_timeout_s "
                                  f"({ctx.config.queue_timeout_s:g} s)", code="workers_full")
        gen.start()
        if not stream:
            return await unless_disconnected(request, _collect(gen, builder))
        first = await unless_disconnected(request, gen.next_event())
        if first is not None and first.error is not None:
            raise first.error
        handed_over = True
        return SSEResponse(stream_events(gen, builder, first, include_usage, close), close)
    except ClientGone:
        return Response(status_code=_CLIENT_GONE)
    finally:
        if not handed_over:
            close()


async def _collect(gen: Generation, builder: ResponseBuilder) -> Response:
    """Every event, then one JSON body (the first error instead, as its status)."""
    while (event := await gen.next_event()) is not None:
        if event.error is not None:
            raise event.error
    body = builder.response()
    return JSONResponse(body if isinstance(body, dict) else body.model_dump())


async def hold_for_worker(request: Request, ctx: RouterContext) -> None:
    """With no healthy worker and ``cold_start_wait_s`` set, wait (signalling demand) for one to start;
    503 with Retry-After if none came. Before validation: the context length comes from the workers."""
    try:
        came = await unless_disconnected(request, ctx.cold_start.wait())
    except ClientGone:  # nobody reads the answer; the status reaches the metrics and the access log
        raise ApiError(_CLIENT_GONE, "the client left while its request was held", code="client_gone") from None
    if not came:
        raise ctx.unavailable(f"no worker became healthy within cold_start_wait_s "
                              f"({ctx.config.cold_start_wait_s:g} s)", code="no_healthy_worker")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise ``ClientGone``."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientGone()
    return work.result()


class _Once:
    """Calls its functions, in order, on the first call only."""

    def __init__(self, *fns: Callable[[], None]) -> None:
        self._fns: tuple[Callable[[], None], ...] | None = fns

    def __call__(self) -> None:
        fns, self._fns = self._fns, None
        for fn in fns or ():
            fn()
