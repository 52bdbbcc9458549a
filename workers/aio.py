"""Handing results between threads and an asyncio loop (the engine thread, link threads)."""

from __future__ import annotations

import asyncio
import threading


def settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    """Resolve ``future`` (on its loop) unless its awaiting coroutine was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a thread of its own. Link operations block for up to the link timeout,
    and one waits for another's peer: on asyncio's small shared pool they could starve each other."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001  (handed to the awaiting coroutine)
            loop.call_soon_threadsafe(settle, future, None, e)
        else:
            loop.call_soon_threadsafe(settle, future, result, None)

    threading.Thread(target=run, daemon=True, name=f"shoal-{getattr(fn, '__name__', 'op')}").start()
    return await future


class LoopQueue:
    """An ``asyncio.Queue`` that another thread (the engine thread) feeds: ``put`` from any thread,
    ``get`` on the queue's own loop. A put after that loop closed is dropped (nobody listens any more)."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is gone
            pass

    async def get(self):
        return await self.queue.get()
