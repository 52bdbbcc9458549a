"""The engine-thread commands: frozen values, and the ``Reply`` handshake of a ``Call``.

The handshake's promise: whichever side comes second (the caller abandoning, the engine thread
delivering) sees the other, so a result nobody takes is undone exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from shoal.workers.aio import LoopQueue
from shoal.workers.engine_commands import Abort, AddRequest, Call, Reply


def test_commands_are_frozen_values():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Abort("a").request_id = "b"
    assert Abort("a") == Abort("a")
    assert not hasattr(Abort("a"), "__dict__")  # slotted


def test_a_delivered_result_reaches_the_caller_and_is_not_undone():
    undone = []

    async def main():
        reply = Reply(undo=undone.append)
        Call(lambda engine: engine + 1, reply).run(41)  # the engine thread's side, inline
        assert await reply.future == 42

    asyncio.run(main())
    assert undone == []


def test_a_result_delivered_after_the_caller_left_is_undone_by_the_engine_thread():
    undone = []

    async def main():
        reply = Reply(undo=undone.append)
        assert reply.abandon() is False  # nothing ran yet: the engine thread will undo
        Call(lambda engine: "reservation", reply).run(None)
        await asyncio.sleep(0)
        assert not reply.future.done()

    asyncio.run(main())
    assert undone == ["reservation"]


def test_the_caller_that_leaves_after_delivery_is_told_to_undo():
    async def main():
        reply = Reply(undo=lambda r: None)
        Call(lambda engine: "reservation", reply).run(None)
        assert reply.abandon() is True and reply.result == "reservation"

    asyncio.run(main())


def test_a_failed_call_is_handed_to_the_caller_and_nothing_is_undone():
    undone = []

    async def main():
        reply = Reply(undo=undone.append)
        Call(lambda engine: 1 / 0, reply).run(None)
        with pytest.raises(ZeroDivisionError):
            await reply.future
        assert reply.abandon() is False

    asyncio.run(main())
    assert undone == []


def test_an_add_request_carries_its_stream():
    async def main():
        stream = LoopQueue()
        cmd = AddRequest(request=None, stream=stream, export=True)
        cmd.stream.put("x")
        assert await asyncio.wait_for(stream.get(), 5) == "x"

    asyncio.run(main())
