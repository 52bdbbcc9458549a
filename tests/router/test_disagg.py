"""Disaggregated prefill/decode on the router side: the planner (pure), the role-aware pool, and the
whole path over HTTP with real gRPC workers (tiny engines with equal random weights: a prefill, a
decode and a unified one, so a disaggregated greedy answer can be checked against a unified one).

A served engine keeps state tied to its server and event loop (its endpoint, its KV links), so each
end-to-end test serves engines of its own; only the unified reference engine is shared.

The tests marked ``needs_worker_prefill`` need ``AsyncEngine.prefill`` and the decode side's
``kv_source`` import (the worker side of disaggregation); without them they are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.router import disagg
from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.host import RouterHost
from shoal.router.disagg import PrefillView, plan_disagg, rank_prefill
from shoal.router.local_worker import LocalWorker
from shoal.router.placement import PlacementRequest, make_policy
from shoal.router.worker_client import GrpcWorkerClient
from shoal.router.worker_pool import WorkerPool, WorkerUnavailable, make_pool
from shoal.workers.async_engine import AsyncEngine
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest, WorkerLoad
from shoal.workers.rpc.servicer import WorkerServicer, start_worker_server

BS = 16  # the tiny engines' block size (conftest)

needs_worker_prefill = pytest.mark.skipif(
    not hasattr(AsyncEngine, "prefill"), reason="the worker side of disaggregation (AsyncEngine.prefill) "
                                                "is not in this tree yet")


def load(waiting: int = 0, running: int = 0) -> WorkerLoad:
    return WorkerLoad(num_running=running, num_waiting=waiting, kv_usage=0.0, num_free_blocks=100,
                      num_total_blocks=100)


def pview(wid: str, tokens: int = 0, waiting: int = 0, healthy: bool = True) -> PrefillView:
    return PrefillView(wid, load(waiting), healthy, tokens)


def prompt(n: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(1000, 30000) for _ in range(n))


def preq(n: int, seed: int = 0) -> PlacementRequest:
    return PlacementRequest(f"r{seed}", prompt(n, seed))


# -- the planner (pure) ---------------------------------------------------------------------------------


def test_plan_goes_straight_to_decode_when_short_cached_or_no_prefill_worker():
    p = [pview("p0")]
    short = plan_disagg(preq(100), ["d0", "d1"], 0, p, 512)
    assert short.outcome == disagg.DIRECT_SHORT and not short.disaggregated
    assert short.prefill_workers == () and short.decode_workers == ("d0", "d1")
    # Long enough, but the decode worker holds all but 600 - 512 + 1 = 89 tokens of it.
    cached = plan_disagg(preq(600), ["d0"], 89, p, 512)
    assert cached.outcome == disagg.DIRECT_CACHED and cached.uncached_tokens == 511
    # One cached token fewer and the 512 uncached tokens are worth a prefill worker.
    plan = plan_disagg(preq(600), ["d0"], 88, p, 512)
    assert plan.outcome == disagg.DISAGGREGATED and plan.prefill_workers == ("p0",)
    assert plan.uncached_tokens == 512 and plan.decode_workers == ("d0",)
    # No prediction (a policy without a prefix index) counts as nothing cached.
    assert plan_disagg(preq(600), ["d0"], None, p, 512).disaggregated
    for views in ([], [pview("p0", healthy=False)]):
        none = plan_disagg(preq(4000), ["d0"], 0, views, 512)
        assert none.outcome == disagg.DIRECT_NO_PREFILL_WORKER and not none.disaggregated


def test_plan_with_threshold_zero_always_disaggregates_when_it_can():
    assert plan_disagg(preq(1), ["d0"], 0, [pview("p0")], 0).disaggregated
    assert plan_disagg(preq(64), ["d0"], 64, [pview("p0")], 0).disaggregated  # even all cached
    assert not plan_disagg(preq(64), ["d0"], 0, [pview("p0", healthy=False)], 0).disaggregated


def test_prefill_choice_fewest_queued_tokens_then_a_stable_tie_break():
    r = preq(1000)
    # Router-tracked tokens plus the reported waiting requests at DEFAULT_WAITING_TOKENS each.
    views = [pview("a", tokens=900), pview("b", tokens=100, waiting=3), pview("c", tokens=300),
             pview("d", healthy=False)]
    assert rank_prefill(r, views) == ("c", "b", "a")  # 300 < 100 + 768 = 868 < 900; d is down
    assert rank_prefill(r, views, waiting_tokens=0) == ("b", "c", "a")
    # Equal queues: the same prompt always ranks the same way, whatever the views' order ...
    idle = [pview(w) for w in ("w0", "w1", "w2", "w3")]
    first = rank_prefill(r, idle)
    assert sorted(first) == ["w0", "w1", "w2", "w3"]
    for _ in range(5):
        assert rank_prefill(r, random.sample(idle, len(idle))) == first
    # ... while unrelated prompts spread over the workers.
    firsts = {rank_prefill(preq(200, seed), idle)[0] for seed in range(40)}
    assert len(firsts) >= 3


def test_disagg_config_and_planner_validation():
    assert RouterConfig().disagg_min_prefill_tokens == 512
    assert RouterConfig(disagg_min_prefill_tokens=0).disagg_min_prefill_tokens == 0
    with pytest.raises(ValueError, match=r"RouterConfig.disagg_min_prefill_tokens must be >= 0, got -1"):
        RouterConfig(disagg_min_prefill_tokens=-1)
    with pytest.raises(ValueError, match="disagg_min_prefill_tokens must be an integer, got 1.5"):
        RouterConfig(disagg_min_prefill_tokens=1.5)
    with pytest.raises(ValueError, match="min_prefill_tokens must be >= 0, got -3"):
        plan_disagg(preq(10), ["d"], 0, [pview("p")], -3)


# -- the role-aware pool (real engines in process) ------------------------------------------------------


@pytest.fixture(scope="module")
def make_engine(tiny_model_dir):
    """``make_engine(worker_id, role, **engine_config)`` -> a started tiny AsyncEngine of that role."""
    from shoal.workers.config import EngineConfig
    from shoal.workers.llm_engine import LLMEngine

    engines = []

    def make(worker_id: str, role: str, **overrides) -> AsyncEngine:
        opts = dict(model=tiny_model_dir, load_format="dummy", device="cpu", dtype="float32", kv_events=True,
                    num_kv_blocks=256, block_size=BS, max_model_len=2048)
        opts.update(overrides)
        engine = AsyncEngine(LLMEngine(EngineConfig(**opts)), worker_id=worker_id, role=role).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="module")
def engines(make_engine):
    """One engine per role; equal seeds give them equal random weights."""
    return {role: make_engine(f"{role}-0", role) for role in ("unified", "prefill", "decode")}


def test_pool_never_ranks_prefill_workers_for_generation(engines):
    async def main():
        pool = WorkerPool(make_policy("prefix_aware", block_size=BS), poll_interval_s=60, kv_retry_s=0.05)
        await pool.start()
        try:
            assert await pool.add_worker(LocalWorker(engines["prefill"]))
            # Healthy, but a prefill worker alone cannot serve a request.
            assert not pool.has_healthy() and pool.views() == [] and pool.rank(preq(64)) == []
            assert [v.worker_id for v in pool.prefill_views()] == ["prefill-0"]
            for role in ("decode", "unified"):
                assert await pool.add_worker(LocalWorker(engines[role]))
            assert pool.has_healthy()
            assert sorted(v.worker_id for v in pool.views()) == ["decode-0", "unified-0"]
            for seed in range(20):
                assert sorted(pool.rank(preq(64, seed))) == ["decode-0", "unified-0"]
            for _ in range(200):  # KV event subscriptions: the generation workers' only
                if all(pool.state(w).kv_batches for w in ("decode-0", "unified-0")):
                    break
                await asyncio.sleep(0.01)
            assert pool.state("decode-0").kv_subscriptions and pool.state("unified-0").kv_subscriptions
            assert pool.state("prefill-0").kv_subscriptions == 0 and pool.state("prefill-0").role == "prefill"

            # The router's queued prefill tokens per prefill worker.
            pool.acquire_prefill("prefill-0", 700)
            pool.acquire_prefill("prefill-0", 300)
            (v,) = pool.prefill_views()
            assert v.in_flight_tokens == 1000 and v.healthy and pool.state("prefill-0").in_flight == 2
            pool.release_prefill("prefill-0", 700)
            assert pool.prefill_views()[0].in_flight_tokens == 300
            pool.release_prefill("prefill-0", 300)
            assert pool.prefill_views()[0].in_flight_tokens == 0 and pool.state("prefill-0").in_flight == 0

            pool.mark_failed("prefill-0", "test")
            assert not pool.prefill_views()[0].healthy
            await pool.poll_once()
            assert pool.prefill_views()[0].healthy
        finally:
            await pool.close()

    asyncio.run(main())


# -- end to end: router over HTTP, workers over gRPC -----------------------------------------------------


class GrpcWorker:
    """A real gRPC worker server over ``engine``, and the router's client of it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.server = self.client = None

    async def start(self) -> "GrpcWorker":
        self.servicer = WorkerServicer(self.engine)
        self.server = await start_worker_server(self.engine, "127.0.0.1", 0, servicer=self.servicer)
        self.client = GrpcWorkerClient(self.engine.worker_id, f"127.0.0.1:{self.server.bound_port}",
                                       connect_timeout_s=1.0, rpc_timeout_s=5.0, first_token_timeout_s=30.0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.servicer.begin_shutdown()
            await self.server.stop(0)
            self.server = None
            close_peers = getattr(self.engine, "close_kv_peers", None)  # a decode worker's KV links
            if close_peers is not None:
                await close_peers()


@contextlib.asynccontextmanager
async def grpc_workers(*engines: AsyncEngine):
    workers = [await GrpcWorker(e).start() for e in engines]
    try:
        yield workers
    finally:
        for w in workers:
            await w.stop()


@contextlib.asynccontextmanager
async def router(workers: list[GrpcWorker], tok, **config):
    """A router app on its RouterHost in this loop: -> (url, app). Polls rarely: the tests decide when
    a worker is seen failing. It closes the workers' clients at the end (its lifespan closes the pool)."""
    config.setdefault("health_interval_s", 60.0)
    cfg = RouterConfig(placement="prefix_aware", placement_options={"block_size": BS}, **config)
    pool = make_pool(cfg)
    for w in workers:
        pool.add(w.client)
    app = create_app(cfg, pool, tok)
    host = RouterHost(app, "127.0.0.1", 0, drain_timeout_s=5.0)
    await host.start(30, need_workers=False)
    try:
        yield host.url, app
    finally:
        await asyncio.wait_for(host.stop(), 30)


async def complete(url: str, ids, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"prompt": list(ids), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
    async with httpx.AsyncClient(timeout=60) as c:
        return await c.post(f"{url}/v1/completions", json=body)


async def metric(url: str, name: str, **labels) -> float:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"{url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def has_sample(url: str, name: str, **labels) -> bool:
    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(f"{url}/metrics")).text
    return any(sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
               for family in text_string_to_metric_families(text) for sample in family.samples)


async def outcomes(url: str) -> dict[str, float]:
    counts = {o: await metric(url, "shoal_router_disagg_requests_total", outcome=o) for o in disagg.OUTCOMES}
    return {o: c for o, c in counts.items() if c}


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


@needs_worker_prefill
def test_disaggregated_greedy_output_equals_unified_and_short_or_cached_prompts_go_direct(make_engine, engines,
                                                                                          tok):
    long_ids, short_ids = prompt(200, seed=101), prompt(40, seed=102)
    prefill, decode = make_engine("prefill-1", "prefill"), make_engine("decode-1", "decode")

    async def main():
        async with grpc_workers(engines["unified"], prefill, decode) as (u, p, d):
            async with router([u], tok) as (url, _):
                want = (await complete(url, long_ids)).json()["choices"][0]["text"]
                want_short = (await complete(url, short_ids)).json()["choices"][0]["text"]
            async with router([p, d], tok, disagg_min_prefill_tokens=64) as (url, app):
                prefill_queries = prefill.engine.scheduler.stats.num_prefix_queries
                decode_hits = decode.engine.scheduler.stats.num_prefix_hits
                r = (await complete(url, long_ids, n=2)).json()
                assert [c["text"] for c in r["choices"]] == [want, want]
                # The decode worker reports the imported tokens as cached: every full block but the
                # one that holds the last prompt token, (200 - 1) // 16 * 16 = 192.
                assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 192
                assert prefill.engine.scheduler.stats.num_prefix_queries > prefill_queries
                # One pull (sibling 0's); sibling 1 started after it and found the blocks cached.
                assert decode.num_kv_fallbacks == 0
                assert decode.engine.scheduler.stats.num_prefix_hits - decode_hits == 2 * 192
                assert await outcomes(url) == {disagg.DISAGGREGATED: 1}  # one prefill for both siblings
                assert await metric(url, "shoal_router_prefill_duration_seconds_count", outcome="ok") == 1

                # Short: under 64 tokens. Cached: the decode worker now holds the long prompt.
                r = (await complete(url, short_ids)).json()
                assert r["choices"][0]["text"] == want_short
                assert (await complete(url, long_ids)).json()["choices"][0]["text"] == want
                assert await outcomes(url) == {disagg.DISAGGREGATED: 1, disagg.DIRECT_SHORT: 1,
                                               disagg.DIRECT_CACHED: 1}
                pool = app.state.ctx.pool
                state = pool.state("prefill-1")
                assert state.prefill_tokens == 0 and state.in_flight == 0 and state.num_placed == 1

    asyncio.run(main())


def test_a_stopped_prefill_worker_falls_back_to_decode_with_the_right_tokens(make_engine, engines, tok):
    ids = prompt(120, seed=201)
    prefill, decode = make_engine("prefill-doomed", "prefill"), make_engine("decode-2", "decode")

    async def main():
        async with grpc_workers(engines["unified"], prefill, decode) as (u, p, d):
            async with router([u], tok) as (url, _):
                want = (await complete(url, ids)).json()["choices"][0]["text"]
            async with router([p, d], tok, disagg_min_prefill_tokens=0) as (url, app):
                pool = app.state.ctx.pool
                assert pool.state("prefill-doomed").healthy  # the start-up poll saw it
                await p.stop()  # the router has not noticed: its next poll is a minute away
                r = await complete(url, ids)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
                assert await outcomes(url) == {disagg.FALLBACK_PREFILL_FAILED: 1}
                # The decode worker computed it (no pull was attempted, so none failed); the series exists.
                assert await has_sample(url, "shoal_router_worker_kv_transfer_failures", worker="decode-2",
                                        kind="fallback")
                assert await metric(url, "shoal_router_worker_kv_transfer_failures", worker="decode-2",
                                    kind="fallback") == 0
                assert await metric(url, "shoal_router_prefill_duration_seconds_count", outcome="failed") == 1
                state = pool.state("prefill-doomed")
                assert not state.healthy and state.last_error and state.prefill_tokens == 0
                # Out of placement now: the next prompt does not even try it.
                r = await complete(url, prompt(120, seed=202))
                assert r.status_code == 200
                assert await outcomes(url) == {disagg.FALLBACK_PREFILL_FAILED: 1,
                                               disagg.DIRECT_NO_PREFILL_WORKER: 1}
                async with httpx.AsyncClient() as c:
                    assert (await c.get(f"{url}/ready")).status_code == 200

    asyncio.run(main())


def test_grpc_prefill_errors_are_typed(engines):
    async def main():
        async with grpc_workers(engines["prefill"]) as (p,):  # only its failure is used
            client = p.client
            await p.stop()
            with pytest.raises(WorkerUnavailable) as e:
                await client.prefill(GenerateRequest("x", prompt(40, 1), SamplingParams(max_tokens=1)))
            assert not e.value.started and e.value.worker_id == "prefill-0"
            await client.close()

    asyncio.run(main())


@needs_worker_prefill
def test_grpc_prefill_returns_a_handle_and_refusals_are_value_errors(make_engine):
    prefill = make_engine("prefill-3", "prefill")

    async def main():
        async with grpc_workers(prefill) as (p,):
            ids = prompt(70, 301)
            kv = await p.client.prefill(GenerateRequest("h", ids, SamplingParams(max_tokens=4)))
            assert kv.endpoint.endswith(f":{p.server.bound_port}") and 0 < kv.num_tokens <= 70
            too_long = prompt(3000, 302)  # max_model_len is 2048
            with pytest.raises(ValueError):
                await p.client.prefill(GenerateRequest("bad", too_long, SamplingParams(max_tokens=1)))
            await p.client.close()
        local = await LocalWorker(prefill).prefill(GenerateRequest("l", ids, SamplingParams(max_tokens=4)))
        assert local.num_tokens == kv.num_tokens

    asyncio.run(main())


@needs_worker_prefill
def test_a_deadline_during_prefill_cancels_the_call_on_the_prefill_worker(make_engine, engines, tok):
    # A prefill worker that runs one request at a time, kept busy: our Prefill call waits in its queue.
    prefill = make_engine("prefill-busy", "prefill", max_num_seqs=1)
    decode = make_engine("decode-4", "decode")

    async def hog():
        async for _ in prefill.generate(GenerateRequest("hog", prompt(16, 400),
                                                        SamplingParams(max_tokens=1500, ignore_eos=True))):
            pass

    async def main():
        async with grpc_workers(prefill, decode) as (p, d):
            async with router([p, d], tok, disagg_min_prefill_tokens=0, request_timeout_s=1.0) as (url, app):
                busy = asyncio.get_running_loop().create_task(hog())
                try:
                    r = await complete(url, prompt(100, 401))
                    assert r.status_code == 504
                    assert await outcomes(url) == {disagg.CANCELLED: 1}
                    state = app.state.ctx.pool.state("prefill-busy")
                    assert state.prefill_tokens == 0 and state.in_flight == 0 and state.healthy
                    sched = prefill.engine.scheduler
                    for _ in range(200):  # the worker aborted the call's request
                        if not any(rid.endswith("-prefill") for rid in sched.requests):
                            break
                        await asyncio.sleep(0.01)
                    assert not any(rid.endswith("-prefill") for rid in sched.requests)
                finally:
                    busy.cancel()
                    await asyncio.gather(busy, return_exceptions=True)

    asyncio.run(main())


# -- under load: aborts and a dying prefill worker ------------------------------------------------------


def test_500_requests_with_aborts_and_a_killed_prefill_worker_leak_nothing(tiny_model_dir, tok):
    """500 requests over 2 prefill and 2 decode workers, a fifth of them abandoned by their client at
    a random moment, and one prefill worker killed halfway: every request that was not abandoned ends
    (200, or an error status), none hangs, and afterwards every worker's blocks are all free (cached
    or not) with nothing pinned or reserved."""
    from shoal.workers.config import EngineConfig
    from shoal.workers.disagg import DisaggConfig
    from shoal.workers.llm_engine import LLMEngine

    def engine(worker_id: str, role: str) -> AsyncEngine:
        cfg = EngineConfig(model=tiny_model_dir, load_format="dummy", device="cpu", dtype="float32",
                           kv_events=True, num_kv_blocks=160, block_size=BS, max_model_len=1024)
        return AsyncEngine(LLMEngine(cfg), worker_id=worker_id, role=role,
                           disagg=DisaggConfig(export_ttl_s=2.0, link_timeout_s=10, rpc_timeout_s=10)).start()

    engines_ = [engine("p0", "prefill"), engine("p1", "prefill"), engine("d0", "decode"), engine("d1", "decode")]
    rng = random.Random(7)
    heads = [prompt(48, seed=300 + g) for g in range(8)]  # shared prefixes: partial hits on decode workers
    plans = [(heads[rng.randrange(8)] + prompt(rng.randrange(1, 120), seed=1000 + i), rng.randrange(1, 9),
              rng.random() < 0.5, rng.random() < 0.2, rng.uniform(0.0, 0.15)) for i in range(500)]

    async def main():
        async with grpc_workers(*engines_) as workers:
            async with router(workers, tok, disagg_min_prefill_tokens=0, health_interval_s=0.2,
                              request_timeout_s=60) as (url, app):
                limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
                async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                    gate = asyncio.Semaphore(24)

                    async def one(i: int):
                        ids, max_tokens, stream, abandon, delay = plans[i]
                        body = {"prompt": list(ids), "max_tokens": max_tokens, "temperature": 0,
                                "ignore_eos": True, "stream": stream}
                        async with gate:
                            call = asyncio.ensure_future(_post(client, url, body, stream))
                            if abandon:
                                await asyncio.sleep(delay)
                                call.cancel()  # the client goes away: its connection closes
                            try:
                                return await asyncio.wait_for(call, 60)
                            except asyncio.CancelledError:
                                return "abandoned"

                    first = await asyncio.gather(*(one(i) for i in range(250)))
                    await workers[0].stop()  # a prefill worker dies with work queued behind it
                    engines_[0].shutdown()
                    second = await asyncio.gather(*(one(i) for i in range(250, 500)))
                results = first + second
                statuses = [r for r in results if r != "abandoned"]
                assert len(results) == 500 and len(statuses) >= 350
                assert all(s == 200 or (isinstance(s, int) and s >= 500) for s in statuses), set(statuses)
                assert statuses.count(200) >= 0.95 * len(statuses)
                counts = await outcomes(url)
                assert counts.get(disagg.DISAGGREGATED, 0) > 100
            # Pins of prefills whose client left before the pull expire (2 s); pulls in flight end.
            deadline = asyncio.get_running_loop().time() + 20
            for e in engines_[1:]:
                while True:
                    load = e.load()
                    if (load.num_pinned_blocks, load.num_importing_blocks, load.num_running) == (0, 0, 0) \
                            and load.num_free_blocks == load.num_total_blocks:
                        break
                    assert asyncio.get_running_loop().time() < deadline, (e.worker_id, load)
                    await asyncio.sleep(0.1)
                await e.call(lambda eng: eng.kv_cache.check_no_leak())
            engines_[0].engine.kv_cache.check_no_leak()  # the dead one released everything on its way out

    try:
        asyncio.run(main())
    finally:
        for e in engines_:
            e.shutdown()


async def _post(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> int:
    """The final status of one completion: 200 only if a streamed one also ended cleanly."""
    if not stream:
        return (await client.post(f"{url}/v1/completions", json=body)).status_code
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code
        done = errored = False
        async for line in resp.aiter_lines():
            errored |= line.startswith("data: {\"error\"")
            done |= line == "data: [DONE]"
        return 500 if errored or not done else 200
