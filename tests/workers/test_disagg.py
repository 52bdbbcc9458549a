"""Disaggregated serving between real workers over gRPC + gloo links (workers/disagg.py).

A prefill worker computes a prompt and pins its blocks; a decode worker pulls the blocks it lacks over
a KV link and continues. The tokens equal a unified worker's exactly; only missing blocks travel;
every failure (a dead prefill worker, an expired pin, an unknown handle) ends in a local prefill on the
decode side with the same tokens; no KV block leaks on either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import grpc
import pytest

from shoal.router.worker_client import GrpcWorkerClient
from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.disagg import DisaggConfig
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.protocol import GenerateRequest, KVHandle
from shoal.workers.rpc import codec
from shoal.workers.rpc import worker_pb2_grpc as pb_grpc
from shoal.workers.rpc.servicer import start_worker_server

BLOCK = 16
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=48, block_size=BLOCK,
              kv_events=True)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompt_of(n: int, seed: int = 0, vocab: int = 384) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, vocab) for _ in range(n))


class Worker:
    """An engine served over gRPC on 127.0.0.1, plus a client the test talks to it with."""

    def __init__(self, model: str, worker_id: str, role: str, disagg: DisaggConfig | None = None, **engine):
        cfg = EngineConfig(model=model, **{**ENGINE, **engine})
        self.engine = AsyncEngine(LLMEngine(cfg), worker_id, role=role, disagg=disagg).start()
        self.server = None

    async def serve(self) -> "Worker":
        self.server = await start_worker_server(self.engine, "127.0.0.1", 0)
        self.client = GrpcWorkerClient(self.engine.worker_id, self.engine.endpoint)
        self._channel = grpc.aio.insecure_channel(self.engine.endpoint)
        self.stub = pb_grpc.WorkerStub(self._channel)
        return self

    async def prefill(self, req: GenerateRequest) -> KVHandle:
        return codec.kv_handle_from_pb(await self.stub.Prefill(codec.generate_request_to_pb(req)))

    async def generate(self, req: GenerateRequest) -> tuple[list[int], int]:
        tokens, cached = [], None
        async for delta in self.client.generate(req):
            tokens += delta.token_ids
            cached = delta.num_cached_tokens if cached is None else cached
        return tokens, cached

    async def check_no_leak(self) -> None:
        await asyncio.sleep(0.1)  # a pull's unpin / a link's close may still be on its way
        await self.engine.call(lambda e: e.kv_cache.check_no_leak())

    async def stop(self) -> None:
        if self.server is not None:
            await self.engine.close_kv_peers()
            await self.client.close()
            await self._channel.close()
            await self.server.stop(0)
            self.server = None
        self.engine.shutdown()


@contextlib.asynccontextmanager
async def served(*workers: Worker):
    """The workers served over gRPC; every one is stopped on the way out, however the block ends."""
    try:
        yield [await w.serve() for w in workers]
    finally:
        for w in workers:
            await w.stop()


async def unified_tokens(model: str, prompts, params: SamplingParams = GREEDY, **engine) -> list[list[int]]:
    ref = AsyncEngine(LLMEngine(EngineConfig(model=model, **{**ENGINE, **engine})), "u").start()
    try:
        out = []
        for i, p in enumerate(prompts):
            out.append([t async for d in ref.generate(GenerateRequest(f"u{i}", p, params)) for t in d.token_ids])
        return out
    finally:
        ref.shutdown()


async def disaggregated(prefill: Worker, decode: Worker, rid: str, prompt) -> tuple[list[int], int, KVHandle]:
    handle = await prefill.prefill(GenerateRequest(rid, prompt, GREEDY))
    tokens, cached = await decode.generate(GenerateRequest(rid, prompt, GREEDY, kv_source=handle))
    return tokens, cached, handle


@pytest.mark.parametrize("arch,chunks", [("llama", 1), ("qwen2", 0), ("llama", 4)])
def test_disaggregated_tokens_equal_unified_with_partial_hits(tiny_checkpoints, arch, chunks):
    """chunks: layers per pipelined chunk received straight into the cache (2 layers: 1 -> two chunks),
    0: one whole tensor through a staging buffer."""
    model = tiny_checkpoints[arch][0]
    shared = prompt_of(2 * BLOCK, seed=1)
    prompts = [prompt_of(70, seed=2), shared + prompt_of(40, seed=3), prompt_of(9, seed=4)]

    async def main():
        expected = await unified_tokens(model, prompts)
        async with served(Worker(model, "p", "prefill"),
                          Worker(model, "d", "decode", disagg=DisaggConfig(layers_per_chunk=chunks))) as (p, d):
            # The decode worker already holds the first two blocks of prompts[1]: only the rest travels.
            await d.generate(GenerateRequest("warm", shared + prompt_of(5, seed=9), GREEDY))
            got = []
            for i, prompt in enumerate(prompts):
                before = d.engine.decode_side.num_received_blocks
                tokens, cached, handle = await disaggregated(p, d, f"r{i}", prompt)
                sent = d.engine.decode_side.num_received_blocks - before
                got.append((tokens, cached, sent, handle.num_tokens))
            assert [g[0] for g in got] == expected
            # 70 tokens: 4 full blocks travel, 6 tokens are computed on the decode side.
            assert got[0][1:] == (64, 4, 64)
            # 72 tokens: 4 transferable blocks, 2 of them already cached on the decode side.
            assert got[1][1:] == (64, 2, 64)
            # 9 tokens: no full block; nothing to move, the decode worker prefills it.
            assert got[2][1:] == (0, 0, 0)
            assert d.engine.num_kv_fallbacks == 0 and len(p.engine.exports) == 0
            assert d.engine.decode_side.num_pipelined == (2 if chunks else 0)  # the two pulls that moved data
            await p.check_no_leak()
            await d.check_no_leak()

    asyncio.run(main())


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (2, 1), (1, 2)])
def test_smollm2_disaggregated_equals_unified(prefill_tp, decode_tp):
    """At TP=2 SmolLM2's 9 query heads split 5 + 4 with padding slots: a TP=2 prefill side gathers the
    3 KV heads from the ranks that hold them, a TP=2 decode side hands each rank the ones it holds.
    (One tensor-parallel engine per process: never TP=2 on both sides here.)"""
    prompt = prompt_of(60, seed=5, vocab=49152)

    async def main():
        engine = dict(max_model_len=512)
        expected = await unified_tokens("smollm2-135m", [prompt], **engine)
        async with served(Worker("smollm2-135m", "p", "prefill", tensor_parallel_size=prefill_tp, **engine),
                          Worker("smollm2-135m", "d", "decode", tensor_parallel_size=decode_tp, **engine)) as (p, d):
            tokens, cached, _ = await disaggregated(p, d, "s", prompt)
            assert [tokens] == expected and cached == 48
            await p.check_no_leak()
            await d.check_no_leak()

    asyncio.run(main())


def test_prefill_tp1_to_decode_tp2(tiny_checkpoints):
    """Heads are re-split on the way: the TP=2 decode worker writes each rank's half of every block."""
    model = tiny_checkpoints["llama"][0]
    prompts = [prompt_of(70, seed=6), prompt_of(50, seed=7)]

    async def main():
        expected = await unified_tokens(model, prompts)
        async with served(Worker(model, "p", "prefill"),
                          Worker(model, "d", "decode", tensor_parallel_size=2)) as (p, d):
            for i, prompt in enumerate(prompts):
                tokens, cached, _ = await disaggregated(p, d, f"t{i}", prompt)
                assert tokens == expected[i]
                assert cached == (len(prompt) - 1) // BLOCK * BLOCK
            assert d.engine.decode_side.num_received_blocks == 4 + 3
            await p.check_no_leak()
            await d.check_no_leak()

    asyncio.run(main())


def test_failures_fall_back_to_a_local_prefill(tiny_checkpoints):
    """Unknown handle, expired pin, dead prefill worker: the decode worker computes the prompt itself
    (same tokens), and neither side keeps a block."""
    model = tiny_checkpoints["llama"][0]
    prompt = prompt_of(70, seed=8)

    async def main():
        [expected] = await unified_tokens(model, [prompt])
        impatient = DisaggConfig(link_timeout_s=3, rpc_timeout_s=3)
        async with served(Worker(model, "p", "prefill", disagg=DisaggConfig(export_ttl_s=0.3)),
                          Worker(model, "d", "decode", disagg=impatient)) as (p, d):
            # 1. A handle the prefill worker never issued.
            bogus = KVHandle("nope", "p", (0, 1), 32, p.engine.endpoint)
            tokens, cached = await d.generate(GenerateRequest("a", prompt, GREEDY, kv_source=bogus))
            assert tokens == expected and cached == 0 and d.engine.num_kv_fallbacks == 1
            await d.engine.call(lambda e: e.kv_cache.pool.reset_prefix_cache())

            # 2. The pin expired before the pull: the prefill worker unpinned it itself.
            handle = await p.prefill(GenerateRequest("b", prompt, GREEDY))
            await asyncio.sleep(0.6)
            assert len(p.engine.exports) == 0 and p.engine.exports.num_expired == 1
            assert p.engine.load().num_expired_pins == 1  # reported to routers (a metric there)
            tokens, cached = await d.generate(GenerateRequest("b", prompt, GREEDY, kv_source=handle))
            assert tokens == expected and cached == 0 and d.engine.num_kv_fallbacks == 2
            await p.check_no_leak()
            await d.engine.call(lambda e: e.kv_cache.pool.reset_prefix_cache())

            # 3. The prefill worker dies between its prefill and the pull.
            handle = await p.prefill(GenerateRequest("c", prompt, GREEDY))
            await p.stop()
            tokens, cached = await d.generate(GenerateRequest("c", prompt, GREEDY, kv_source=handle))
            assert tokens == expected and d.engine.num_kv_fallbacks == 3
            assert d.engine.load().num_kv_fallbacks == 3
            await d.check_no_leak()

    asyncio.run(main())


def test_cancelled_prefill_and_refusals_leave_nothing(tiny_checkpoints):
    model = tiny_checkpoints["llama"][0]

    async def main():
        p = await Worker(model, "p", "prefill", disagg=DisaggConfig(export_ttl_s=0.5)).serve()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await p.prefill(GenerateRequest("x", prompt_of(300), GREEDY))  # > max_model_len
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_model_len" in refused.value.details()
            # Cancel prefills mid-flight: the worker aborts those still running; a prefill that
            # finished as its caller left stays pinned only until export_ttl_s.
            calls = [asyncio.ensure_future(p.prefill(GenerateRequest(f"c{i}", prompt_of(200, seed=i), GREEDY)))
                     for i in range(6)]
            await asyncio.sleep(0.05)
            for c in calls:
                c.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(1.0)
            assert len(p.engine.exports) == 0
            await p.check_no_leak()
        finally:
            await p.stop()

    asyncio.run(main())


def test_geometry_mismatch_is_refused(tiny_checkpoints):
    """A decode worker whose blocks have another shape cannot open a link: it falls back."""
    model = tiny_checkpoints["llama"][0]

    async def main():
        async with served(Worker(model, "p", "prefill"), Worker(model, "d", "decode", block_size=32)) as (p, d):
            prompt = prompt_of(40, seed=3)
            handle = await p.prefill(GenerateRequest("g", prompt, GREEDY))
            await d.generate(GenerateRequest("g", prompt, GREEDY, kv_source=handle))
            assert d.engine.num_kv_fallbacks == 1 and d.engine.decode_side.num_received_blocks == 0
            await d.check_no_leak()

    asyncio.run(main())


def test_prefill_links_are_bounded_but_a_busy_link_is_never_retired():
    """Past ``max_links`` opening a link retires the least recently used idle one, never one that is
    sending."""
    import threading
    from datetime import timedelta

    import torch

    from shoal.workers.disagg import PrefillLinks
    from shoal.workers.executor.kv_transfer import KVLink

    links = PrefillLinks("127.0.0.1", torch.device("cpu"), DisaggConfig(max_links=1, link_timeout_s=10))
    peers = []

    def open_pair(link_id: str) -> KVLink:
        t = threading.Thread(target=lambda: peers.append(KVLink.connect(
            link_id, 1, "127.0.0.1", links.port, timeout=timedelta(seconds=10))))
        t.start()
        links.open(link_id)
        t.join(15)
        return links.get(link_id)

    try:
        a = open_pair("a")
        with links.sending(a):
            open_pair("b")  # a is busy: it stays although that makes two
            assert len(links) == 2 and not a.closed
        open_pair("c")  # a and b are idle now: the older ones go, c stays
        assert len(links) == 1 and a.closed and not links.get("c").closed
    finally:
        for p in peers:
            p.close()
        links.close_all()


def test_seeded_sampling_equals_unified(tiny_checkpoints):
    """The decode worker samples every output token with the request's own seed, so a seeded sampled
    request gives the unified worker's tokens too."""
    model = tiny_checkpoints["llama"][0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=8, ignore_eos=True)
    prompt = prompt_of(70, seed=11)

    async def main():
        [expected] = await unified_tokens(model, [prompt], seeded)
        async with served(Worker(model, "p", "prefill"), Worker(model, "d", "decode")) as (p, d):
            handle = await p.prefill(GenerateRequest("s", prompt, seeded))
            tokens, cached = await d.generate(GenerateRequest("s", prompt, seeded, kv_source=handle))
            assert tokens == expected and cached == 64 and d.engine.num_kv_fallbacks == 0

    asyncio.run(main())
