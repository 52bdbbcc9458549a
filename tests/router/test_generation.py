"""``Generation.next_event`` under cancellation: a client that leaves must stop its request."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from shoal.router.errors import ApiError
from shoal.router.generation import Generation
from shoal.workers.engine.sampling_params import SamplingParams


def _generation() -> Generation:
    ctx = SimpleNamespace(clock=time.monotonic, config=SimpleNamespace(request_timeout_s=60.0))
    gen = Generation(ctx, "completions", [], SamplingParams(max_tokens=4), 1, None, 0)
    gen.events.expect(1)  # one child that has not ended
    return gen


def test_a_cancel_that_races_a_ready_event_is_not_lost():
    # The event arrives and the waiter is cancelled in the same loop turn. asyncio.wait_for on
    # Python 3.11 returned the event and dropped the cancellation: the router then kept collecting
    # a request whose client had left.
    async def main():
        gen = _generation()
        waiter = asyncio.ensure_future(gen.next_event())
        await asyncio.sleep(0)  # now blocked on the queue
        gen.events.put(SimpleNamespace(finished=False, error=None))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gen.events.queued == 1  # the event stays queued for whoever reads next

    asyncio.run(main())


def test_the_deadline_is_a_504():
    async def main():
        gen = _generation()
        gen.deadline = gen.ctx.clock() + 0.05
        with pytest.raises(ApiError) as e:
            await gen.next_event()
        assert e.value.status == 504 and e.value.code == "deadline_exceeded"

    asyncio.run(main())
