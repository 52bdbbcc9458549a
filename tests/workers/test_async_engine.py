"""AsyncEngine on a tiny model: streaming, abort within a step, KV events, load, liveness."""

from __future__ import annotations

import asyncio

import pytest

from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.protocol import GenerateRequest, block_hashes


@pytest.fixture(scope="module")
def aengine(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    cfg = EngineConfig(model=path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                       block_size=8, kv_events=True)
    eng = AsyncEngine(LLMEngine(cfg)).start()
    yield eng
    eng.shutdown()
    assert not eng.running


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def collect(eng, req):
    return [d async for d in eng.generate(req)]


def test_stream_matches_offline_and_ends_with_a_reason(aengine):
    prompt = tuple(range(3, 30))
    deltas = asyncio.run(collect(aengine, GenerateRequest("a", prompt, greedy(6))))
    tokens = [t for d in deltas for t in d.token_ids]
    assert len(tokens) == 6 and deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    aengine.engine.kv_cache.check_no_leak()


def test_leaving_the_stream_aborts_the_request(aengine):
    async def main():
        req = GenerateRequest("b", tuple(range(3, 40)), greedy(200))
        async for _ in aengine.generate(req):
            break  # the client went away after the first token
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not aengine.engine.core.has_unfinished_requests():
                return
        raise AssertionError("request still running after the stream was dropped")

    asyncio.run(main())
    aengine.engine.kv_cache.check_no_leak()


def test_bad_input_is_refused_before_it_reaches_the_engine(aengine):
    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(collect(aengine, GenerateRequest("c", tuple([5] * 300), greedy(2))))
    with pytest.raises(ValueError, match="n must be 1"):
        asyncio.run(collect(aengine, GenerateRequest("d", (5, 6), SamplingParams(n=2))))


def test_kv_events_start_with_a_snapshot_then_follow_changes(aengine):
    async def main():
        sub = aengine.subscribe_kv_events()
        first = await asyncio.wait_for(sub.__anext__(), 5)
        assert first.kind == "snapshot"
        prompt = tuple(range(100, 140))
        await collect(aengine, GenerateRequest("e", prompt, greedy(1)))
        stored = set()
        seq = first.seq
        while not set(block_hashes(prompt, 8)) <= stored:
            batch = await asyncio.wait_for(sub.__anext__(), 5)
            assert batch.seq == seq + 1  # no gaps
            seq = batch.seq
            if batch.kind == "stored":
                stored |= set(batch.block_hashes)
        sub.close()

    asyncio.run(main())


def test_load_and_liveness(aengine):
    load = aengine.load()
    assert load.num_total_blocks == 64 and load.num_running == 0 and 0 <= load.kv_usage <= 1
    assert aengine.alive()
    assert aengine.info().block_size == 8


def test_oldest_wait_is_the_longest_a_queued_request_has_waited(tiny_checkpoints):
    """The queue policy's trigger, as the worker actor reports it: 0 with an empty queue, then the
    age of the oldest request the scheduler holds back (the engine thread is not started here, so
    nothing leaves the queue)."""
    path, _ = tiny_checkpoints["llama"]
    engine = LLMEngine(EngineConfig(model=path, device="cpu", dtype="float32", max_model_len=256,
                                    num_kv_blocks=16, block_size=8))
    eng = AsyncEngine(engine)
    assert eng.oldest_wait_s() == 0.0
    engine.add_request(list(range(3, 40)), greedy(4))
    first = eng.oldest_wait_s()
    engine.add_request(list(range(3, 40)), greedy(4))
    later = eng.oldest_wait_s()
    assert 0.0 < first <= later < 60.0  # the first request's age, growing; the second is younger
