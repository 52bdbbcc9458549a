"""Worker-side Prometheus metrics (``workers/metrics.py``): vLLM's names, fed by the engine thread.

Two levels: the real scheduler and block pool driven step by step under an injected clock (exact
timings), and a real engine on a tiny model behind a real gRPC server (the ``GetMetrics`` RPC and
the plain HTTP port), whose counts must equal the tokens sent and generated.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.router.worker_client import GrpcWorkerClient
from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.engine.outputs import ModelRunnerOutput
from shoal.workers.engine.request import Request, RequestStatus
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.engine.scheduler import Scheduler, SchedulerConfig
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.metrics import (ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, EngineMetrics,
                                   build_1_2_5_buckets)
from shoal.workers.models.presets import PRESETS
from shoal.workers.protocol import GenerateRequest
from shoal.workers.rpc.servicer import start_worker_server
from shoal.workers.server import start_metrics_http

NUM_BLOCKS, BLOCK_SIZE, MAX_LEN = 64, 8, 256

VLLM_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
    "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
]
SHOAL_NAMES = ["shoal:kv_blocks_total", "shoal:kv_blocks_free", "shoal:kv_blocks_cached", "shoal:kv_blocks_in_use",
               "shoal:engine_steps"]


class Series:
    """Parsed exposition text: ``value(sample_name, **labels)`` sums the samples that match."""

    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels) -> float:
        found = [s.value for s in self.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert found, f"no sample {name} {labels}"
        return sum(found)

    def buckets(self, name: str) -> tuple[float, ...]:
        return tuple(float(s.labels["le"]) for s in self.samples
                     if s.name == f"{name}_bucket" and s.labels["le"] != "+Inf")


# -- the real scheduler and block pool, time injected ---------------------------------------------
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_vllm_buckets_and_names():
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4096)[-1] == 2000
    sched = Scheduler(SchedulerConfig(max_model_len=MAX_LEN), KVCacheManager(NUM_BLOCKS, BLOCK_SIZE))
    s = Series(EngineMetrics("m", MAX_LEN, sched, sched.kv_cache).render().decode())
    assert set(VLLM_NAMES + SHOAL_NAMES) <= set(s.families)
    assert s.buckets("vllm:time_to_first_token_seconds") == TTFT_BUCKETS
    assert s.buckets("vllm:inter_token_latency_seconds") == ITL_BUCKETS
    assert s.buckets("vllm:time_per_output_token_seconds") == ITL_BUCKETS
    assert s.buckets("vllm:e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS
    assert s.buckets("vllm:request_prompt_tokens") == build_1_2_5_buckets(MAX_LEN)
    assert all(sample.labels["model_name"] == "m" for sample in s.samples)
    for reason in ("stop", "length", "abort", "error"):  # every finish reason exists from the start
        assert s.value("vllm:request_success_total", finished_reason=reason) == 0
    assert s.value("shoal:kv_blocks_total") == NUM_BLOCKS and s.value("shoal:kv_blocks_free") == NUM_BLOCKS


def step(sched: Scheduler, metrics: EngineMetrics, clock: Clock, duration: float, token: int = 7) -> None:
    """One engine step of ``duration`` seconds: every request that reached its end samples ``token``."""
    started = clock()
    out = sched.schedule()
    clock.t += duration
    sampled = {rid: token for rid, n in out.num_scheduled_tokens.items()
               if sched.requests[rid].num_computed_tokens >= sched.requests[rid].num_tokens}
    metrics.observe_step(started, sched.update_from_output(out, ModelRunnerOutput(sampled)))


def test_request_timings_follow_the_injected_clock():
    clock = Clock()
    # a budget of 16 tokens: the 20-token prompt takes two (chunked) prefill steps
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_model_len=MAX_LEN),
                      KVCacheManager(NUM_BLOCKS, BLOCK_SIZE))
    metrics = EngineMetrics("m", MAX_LEN, sched, sched.kv_cache, clock=clock)
    req = Request("a", list(range(1, 21)), SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add_request(req)
    metrics.observe_added("a", 20)
    clock.t += 0.5  # queued for 0.5 s before the first step
    s = Series(metrics.render().decode())
    assert s.value("vllm:num_requests_waiting") == 1 and s.value("vllm:num_requests_running") == 0

    step(sched, metrics, clock, 0.25)  # prefill chunk 1: no token
    s = Series(metrics.render().decode())
    assert s.value("vllm:num_requests_running") == 1 and s.value("vllm:num_requests_waiting") == 0
    assert s.value("shoal:kv_blocks_in_use") == 2 and s.value("vllm:time_to_first_token_seconds_count") == 0
    step(sched, metrics, clock, 0.25)  # prefill chunk 2: first token at t0 + 1.0
    step(sched, metrics, clock, 0.1)   # decode
    step(sched, metrics, clock, 0.1)   # decode: max_tokens reached

    s = Series(metrics.render().decode())
    assert s.value("vllm:time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert s.value("vllm:inter_token_latency_seconds_count") == 2
    assert s.value("vllm:inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert s.value("vllm:time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert s.value("vllm:request_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert s.value("vllm:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert s.value("vllm:request_prefill_time_seconds_sum") == pytest.approx(0.5)
    assert s.value("vllm:request_decode_time_seconds_sum") == pytest.approx(0.2)
    assert s.value("vllm:request_inference_time_seconds_sum") == pytest.approx(0.7)
    assert s.value("vllm:e2e_request_latency_seconds_sum") == pytest.approx(1.2)
    assert s.value("vllm:e2e_request_latency_seconds_count") == 1
    assert s.value("vllm:request_success_total", finished_reason="length") == 1
    assert s.value("vllm:prompt_tokens_total") == 20 and s.value("vllm:generation_tokens_total") == 3
    assert s.value("vllm:request_prompt_tokens_sum") == 20 and s.value("vllm:request_generation_tokens_sum") == 3
    assert s.value("vllm:prefix_cache_queries_total") == 20 and s.value("vllm:prefix_cache_hits_total") == 0
    assert s.value("shoal:engine_steps_total") == 4
    assert s.value("vllm:num_requests_running") == 0 and s.value("shoal:kv_blocks_in_use") == 0
    assert s.value("shoal:kv_blocks_cached") == 2  # the prompt's two full blocks stay cached, evictable


def test_a_request_aborted_while_waiting_spent_its_time_queued():
    clock = Clock()
    sched = Scheduler(SchedulerConfig(max_model_len=MAX_LEN), KVCacheManager(NUM_BLOCKS, BLOCK_SIZE))
    metrics = EngineMetrics("m", MAX_LEN, sched, sched.kv_cache, clock=clock)
    sched.add_request(Request("w", [1, 2, 3], SamplingParams(max_tokens=4)))
    metrics.observe_added("w", 3)
    clock.t += 2.0
    sched.finish_requests(["w"], RequestStatus.FINISHED_ABORTED)
    metrics.observe_finished("w", "abort")
    metrics.observe_finished("w", "abort")  # a second abort of a finished id is ignored
    s = Series(metrics.render().decode())
    assert s.value("vllm:request_success_total", finished_reason="abort") == 1
    assert s.value("vllm:request_queue_time_seconds_sum") == pytest.approx(2.0)
    assert s.value("vllm:request_prefill_time_seconds_sum") == 0
    assert s.value("vllm:time_to_first_token_seconds_count") == 0  # no token, no TTFT
    assert s.value("vllm:prompt_tokens_total") == 0  # counted when the prefill completes, as vLLM does
    assert s.value("vllm:num_requests_waiting") == 0


def test_preemptions_are_counted():
    clock = Clock()
    # 4 blocks of 4 tokens: two 6-token prompts fit, then both grow past 8 tokens and one is preempted
    sched = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(4, 4))
    metrics = EngineMetrics("m", 64, sched, sched.kv_cache, clock=clock)
    for rid in ("p", "q"):
        sched.add_request(Request(rid, list(range(1, 7)), SamplingParams(max_tokens=6, ignore_eos=True)))
        metrics.observe_added(rid, 6)
    while sched.has_unfinished():
        step(sched, metrics, clock, 0.01)
    s = Series(metrics.render().decode())
    assert sched.stats.num_preemptions > 0
    assert s.value("vllm:num_preemptions_total") == sched.stats.num_preemptions
    assert s.value("vllm:request_success_total", finished_reason="length") == 2
    assert s.value("vllm:e2e_request_latency_seconds_count") == 2
    assert s.value("vllm:generation_tokens_total") == 12 and s.value("shoal:kv_blocks_in_use") == 0


# -- a real engine behind a real gRPC server ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-metrics")
    (path / "config.json").write_text(json.dumps(PRESETS["tiny-smollm2-vocab"]))
    return str(path)


@pytest.fixture
def engine(tiny_dir):
    cfg = EngineConfig(model=tiny_dir, load_format="dummy", device="cpu", dtype="float32", kv_events=True,
                       num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_model_len=MAX_LEN)
    eng = AsyncEngine(LLMEngine(cfg), worker_id="w-metrics").start()
    yield eng
    eng.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def run(client: GrpcWorkerClient, rid: str, prompt: tuple[int, ...], n: int) -> int:
    tokens = 0
    async for delta in client.generate(GenerateRequest(rid, prompt, greedy(n))):
        tokens += len(delta.token_ids)
    return tokens


async def served(engine: AsyncEngine):
    server = await start_worker_server(engine, "127.0.0.1", 0)
    return server, GrpcWorkerClient(engine.worker_id, f"127.0.0.1:{server.bound_port}")


def test_get_metrics_counts_what_was_sent_and_generated(engine):
    # no two of the concurrent prompts share a block; the last, run after them, shares 3 full blocks
    # (24 tokens) with the third (at most (32 - 1) // 8 blocks can hit: one token is left to compute)
    prompts = [tuple(range(1, 6)), tuple(range(100, 117)), tuple(range(200, 230))]
    shared = tuple(range(200, 230)) + (99, 98)
    lengths = (4, 6, 3, 5)

    async def main():
        server, client = await served(engine)
        try:
            got = await asyncio.gather(*(run(client, f"r{i}", p, n)
                                         for i, (p, n) in enumerate(zip(prompts, lengths))))
            got.append(await run(client, "r3", shared, lengths[3]))
            assert got == list(lengths)
            return Series(await client.get_metrics())
        finally:
            await client.close()
            await server.stop(0)

    s = asyncio.run(main())
    sent = sum(map(len, prompts)) + len(shared)
    assert s.value("vllm:prompt_tokens_total") == sent
    assert s.value("vllm:generation_tokens_total") == sum(lengths)
    assert s.value("vllm:request_success_total", finished_reason="length") == 4
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens"):
        assert s.value(f"vllm:{name}_count") == 4, name  # once per request
    assert s.value("vllm:inter_token_latency_seconds_count") == sum(lengths) - 4
    assert s.value("vllm:request_prompt_tokens_sum") == sent
    assert s.value("vllm:request_generation_tokens_sum") == sum(lengths)
    assert s.value("vllm:prefix_cache_queries_total") == sent
    assert s.value("vllm:prefix_cache_hits_total") == 24
    # idle again: gauges back to 0, every block back in the free pool
    assert s.value("vllm:num_requests_running") == 0 and s.value("vllm:num_requests_waiting") == 0
    assert s.value("vllm:gpu_cache_usage_perc") == 0 and s.value("vllm:kv_cache_usage_perc") == 0
    assert s.value("shoal:kv_blocks_in_use") == 0 and s.value("shoal:kv_blocks_free") == NUM_BLOCKS
    assert s.value("shoal:kv_blocks_total") == NUM_BLOCKS and s.value("shoal:kv_blocks_cached") > 0
    assert s.value("shoal:engine_steps_total") >= max(lengths)
    assert {x.labels["model_name"] for x in s.samples} == {engine.engine.config.model}


def test_scrape_sees_blocks_taken_outside_any_request(engine):
    """Blocks held through an engine-thread call (as KV imports and pinned exports are) show at the
    next scrape: it refreshes on the engine thread, not only when a request comes or goes."""

    async def main():
        server, client = await served(engine)
        try:
            held = await engine.call(lambda e: e.kv_cache.pool.allocate(3))
            during = Series(await client.get_metrics())
            await engine.call(lambda e: e.kv_cache.pool.release(held))
            after = Series(await client.get_metrics())
            return during, after
        finally:
            await client.close()
            await server.stop(0)

    during, after = asyncio.run(main())
    assert during.value("shoal:kv_blocks_in_use") == 3 and during.value("shoal:kv_blocks_free") == NUM_BLOCKS - 3
    assert during.value("vllm:gpu_cache_usage_perc") == pytest.approx(3 / NUM_BLOCKS)
    assert after.value("shoal:kv_blocks_in_use") == 0


def test_an_aborted_stream_is_counted_and_frees_its_blocks(engine):
    async def main():
        server, client = await served(engine)
        try:
            stream = client.generate(GenerateRequest("long", tuple(range(1, 20)), greedy(200)))
            await anext(stream)  # running: it holds blocks now
            # Hold the engine thread between two steps (reading the series there), queue the abort
            # behind it, then let go: the abort applies before another step, whatever the timing.
            gate, busy = threading.Event(), []
            engine.call_soon(lambda e: (busy.append(engine.metrics.render()), gate.wait(30)))
            engine.abort("long")
            gate.set()
            reasons = [d.finish_reason async for d in stream]
            assert reasons[-1] == "abort"
            return Series(busy[0].decode()), Series(await client.get_metrics())
        finally:
            await client.close()
            await server.stop(0)

    busy, idle = asyncio.run(main())
    assert busy.value("vllm:num_requests_running") == 1 and busy.value("shoal:kv_blocks_in_use") >= 3
    assert busy.value("vllm:request_success_total", finished_reason="abort") == 0
    assert idle.value("vllm:request_success_total", finished_reason="abort") == 1
    assert idle.value("vllm:num_requests_running") == 0 and idle.value("shoal:kv_blocks_in_use") == 0
    assert idle.value("vllm:e2e_request_latency_seconds_count") == 1
    assert idle.value("vllm:time_to_first_token_seconds_count") == 1


def test_metrics_http_port_serves_the_same_registry(engine):
    server = start_metrics_http(engine, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            s = Series(resp.read().decode())
        assert set(VLLM_NAMES + SHOAL_NAMES) <= set(s.families)
        assert s.value("shoal:kv_blocks_total") == NUM_BLOCKS
        with pytest.raises(ValueError, match=f"--metrics-port {server.server_port}: cannot listen"):
            start_metrics_http(engine, "127.0.0.1", server.server_port)
    finally:
        server.shutdown()
        server.server_close()
