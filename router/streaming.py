"""Server-sent events: a generation's events as ``data:`` lines, in a response that notices a client
going away and always cleans up.

A stream ends with ``data: [DONE]`` however it ends (unless its builder's ``ends_with_done`` is false:
the Responses API's); an error after the first token (a worker failing, the deadline) is sent as the
builder's ``error_chunks`` (chat and completions: one ``data: {"error": ...}`` event) before it, since
the status line is long gone. A builder may answer an event with several chunks (a list), and a
:class:`NamedEvent` goes out with an ``event:`` line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import anyio
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from .choice import Event
from .errors import ApiError
from .responses import ResponseBuilder

if TYPE_CHECKING:
    from .generation import Generation

DONE = "data: [DONE]\n\n"


# Characters that str.splitlines() (and so httpx's iter_lines, and many SSE readers) take for a line
# break although SSE ends lines only at CR and LF. JSON keeps them raw inside strings; a generated
# token holding one (random or multilingual text) would cut its event in two for such a client.
# Written as JSON \u escapes they parse back to the same string.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


@dataclass(frozen=True)
class NamedEvent:
    """An SSE event with an ``event:`` name (the Responses API's)."""

    name: str
    data: dict


def sse(payload: BaseModel | dict | NamedEvent) -> str:
    if isinstance(payload, NamedEvent):
        return f"event: {payload.name}\n{sse(payload.data)}"
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data.translate(_LINE_BREAKS)}\n\n"


def _lines(chunks: Any) -> Iterator[str]:
    """A builder's answer (None, one chunk, or a list of them) as SSE text."""
    if chunks is None:
        return
    for chunk in chunks if isinstance(chunks, list) else [chunks]:
        yield sse(chunk)


async def stream_events(gen: Generation, builder: ResponseBuilder, first: Event | None, include_usage: bool,
                        close: Callable[[], None]) -> AsyncIterator[str]:
    """The body of a stream whose ``first`` event has already been taken; ``close`` runs when it ends."""
    try:
        for line in _lines(builder.start_chunks()):
            yield line
        event = first
        while event is not None:
            if event.error is not None:  # after the first token: end the stream with the error
                for line in _lines(builder.error_chunks(event.error.body())):
                    yield line
                break
            # None: the event says nothing yet (text held back by a tool parser)
            for line in _lines(builder.event_chunk(event)):
                yield line
            event = await gen.next_event()
        else:
            for line in _lines(builder.end_chunks(include_usage)):
                yield line
    except ApiError as e:  # the deadline
        for line in _lines(builder.error_chunks(e.body())):
            yield line
    finally:
        close()
    if builder.ends_with_done:
        yield DONE


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` that always notices a client going away, and always cleans up.

    Starlette listens for ``http.disconnect`` only on servers reporting ASGI spec < 2.4; with 2.4 it
    waits for a write to fail, which uvicorn's h11 protocol silently drops instead. This listens on
    any server, and runs ``on_close`` (abort the children, free the concurrency slot) however the
    response ends, even if the body iterator never started.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()
        finally:
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
