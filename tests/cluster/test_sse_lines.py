"""SSE lines: the benches split a stream only where SSE does, and the router never emits a character
that a splitlines-based reader would take for a line break."""

from __future__ import annotations

import asyncio
import json

import httpx

from shoal.cluster.bench.sse import sse_lines
from shoal.router.streaming import sse

TRICKY = "a\u2028b\x85c\x0cd\x1ce\u2029f"  # each one a line break to str.splitlines()


class Chunks(httpx.AsyncByteStream):
    """A body that arrives in the given pieces."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def lines_of(chunks: list[bytes]) -> list[str]:
    async def go():
        resp = httpx.Response(200, stream=Chunks(chunks))
        return [line async for line in sse_lines(resp)]
    return asyncio.run(go())


def test_a_data_line_with_unicode_line_separators_stays_one_line():
    # As a server that keeps non-ASCII raw writes it (the control characters among TRICKY get escaped,
    # U+0085, U+2028 and U+2029 stay raw).
    data = json.dumps({"text": TRICKY}, ensure_ascii=False)
    assert "\u2028" in data and "\x85" in data
    body = f"data: {data}\n\ndata: [DONE]\n\n".encode()
    got = [line for line in lines_of([body[:9], body[9:20], body[20:]]) if line]
    assert got == [f"data: {data}", "data: [DONE]"]
    assert json.loads(got[0][6:])["text"] == TRICKY


def test_lf_cr_and_crlf_end_lines_across_chunk_boundaries():
    got = lines_of([b"data: 1\r", b"\ndata: 2\rdata: ", b"3\n", b"data: 4"])
    assert [line for line in got if line] == ["data: 1", "data: 2", "data: 3", "data: 4"]


def test_the_router_escapes_what_splitlines_would_break_on():
    from pydantic import BaseModel

    class Chunk(BaseModel):
        text: str

    for payload in (Chunk(text=TRICKY), {"text": TRICKY}):
        event = sse(payload)
        assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1, repr(event)
        assert json.loads(event[len("data: "):])["text"] == TRICKY
