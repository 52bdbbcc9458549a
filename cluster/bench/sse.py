"""Reading a server-sent-events body the way SSE defines its lines.

An SSE line ends at LF, CR or CRLF, and nowhere else. httpx's ``aiter_lines`` follows
``str.splitlines`` instead, which also breaks at U+2028, U+0085, form feeds and the like: characters a
server may leave raw inside a JSON string (generated text), which then cut one event in two and make
its JSON unparseable. The benches read streams through :func:`sse_lines`.
"""

from __future__ import annotations

from typing import AsyncIterator

import httpx


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The body's lines, split at LF, CR or CRLF only (a CRLF cut between chunks yields one extra
    empty line, which SSE readers treat as the event boundary it already is)."""
    pending = ""
    async for text in resp.aiter_text():
        pending += text.replace("\r\n", "\n").replace("\r", "\n")
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line
    if pending:
        yield pending
