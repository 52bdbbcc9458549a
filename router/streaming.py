"""Server-sent events: a generation's events as ``data:`` lines, in a response that notices a client
going away and always cleans up.

A stream ends with ``data: [DONE]`` however it ends; an error after the first token (a worker
failing, the deadline) is sent as one ``data: {"error": ...}`` event before it, since the status
line is long gone.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .choice import Event
from .errors import ApiError
from .responses import ResponseBuilder

if TYPE_CHECKING:
    from .generation import Generation

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def stream_events(gen: Generation, builder: ResponseBuilder, first: Event | None, include_usage: bool,
                        close: Callable[[], None]) -> AsyncIterator[str]:
    """The body of a stream whose ``first`` event has already been taken; ``close`` runs when it ends.

    Events that are ready together leave in one chunk (one write, one wake-up of the client): the
    start chunks with the first event, the usage chunk or a late error with the end marker.
    """
    head, tail = "", ""
    try:
        head = "".join(sse(chunk) for chunk in builder.start_chunks())
        event = first
        while event is not None:
            if event.error is not None:  # after the first token: end the stream with the error
                tail = sse(event.error.body())
                break
            yield head + sse(builder.event_chunk(event))
            head = ""
            event = await gen.next_event()
        else:
            if include_usage:
                tail = sse(builder.usage_chunk())
    except ApiError as e:  # the deadline
        tail = sse(e.body())
    finally:
        close()
    yield head + tail + DONE


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` that always notices a client going away, and always cleans up.

    Starlette listens for ``http.disconnect`` only on servers reporting ASGI spec < 2.4; with 2.4 it
    waits for a write to fail, which uvicorn's h11 protocol silently drops instead. This listens on
    any server (one watcher task, which cancels the streaming task when the client leaves), and runs
    ``on_close`` (abort the children, free the concurrency slot) however the response ends, even if
    the body iterator never started.

    The body streams in the calling task, and the first chunk is made before the status line is
    sent, so the headers and the first event leave back to back: no task hop before the first token,
    and a client on a busy host is not woken for the headers alone.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        watch = DisconnectWatch(receive)
        try:
            await self.stream_response(send)
        except OSError:  # the client went away mid-write
            pass
        except asyncio.CancelledError:
            if not watch.withdraw():  # not (only) the client leaving: a shutdown
                raise
        finally:
            watch.close()
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()

    async def stream_response(self, send) -> None:
        chunks = aiter(self.body_iterator)
        first = await anext(chunks, None)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if first is not None:
            await send({"type": "http.response.body", "body": first.encode(), "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class DisconnectWatch:
    """While open, cancels the task that opened it as soon as ``receive`` reports ``http.disconnect``.

    The work stays in the caller's own task (a first token waits for no hop through another task);
    only the listening runs in a task of its own. After a ``CancelledError``, :meth:`withdraw` says
    whether it was this watch's doing alone (the client left) and takes the cancel back; a cancel
    from anyone else (a server shutdown) must propagate. :meth:`close` ends the watch.
    """

    def __init__(self, receive: Callable[[], Awaitable[dict]]) -> None:
        self.gone = False
        self._withdrawn = False
        self._task = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict]]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()

    def withdraw(self) -> bool:
        """True when the client left and no one else cancelled the task (whose cancel is then undone)."""
        if not self.gone or self._withdrawn:
            return False
        self._withdrawn = True
        uncancel = getattr(self._task, "uncancel", None)  # Python >= 3.11 counts cancel requests
        return uncancel is None or uncancel() == 0

    def close(self) -> None:
        self._watcher.cancel()
        if self.gone:  # the work absorbed the cancel, or ended as the client left: undo it all the same
            self.withdraw()
