"""A request that can never fit the KV cache is a 400 at once and leaves its worker serving; health
does not flap (a long step, an idle loop, one slow poll, a request's own error never read as dead).

End to end over real components: a tiny engine with ``num_kv_blocks=4`` (64 tokens of KV cache)
behind a real gRPC worker server, and the real router app on its RouterHost. The health logic is
unit-tested with injected time: no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.host import RouterHost
from shoal.router.local_worker import LocalWorker
from shoal.router.placement import make_policy
from shoal.router.worker_client import GrpcWorkerClient
from shoal.router.worker_pool import WorkerPool, WorkerUnavailable, make_pool, shows_worker_down
from shoal.workers.engine.output_processor import CompletionState, sibling_params
from shoal.workers.engine.sampling_params import InvalidParam, SamplingParams
from shoal.workers.heartbeat import StepWatch
from shoal.workers.protocol import GenerateRequest
from shoal.workers.rpc.servicer import WorkerServicer, start_worker_server

BS = 16
KV_BLOCKS = 4
CAPACITY = KV_BLOCKS * BS  # tokens the cache can ever hold


@pytest.fixture(scope="module")
def small_cache_engine(make_tiny_engine):
    return make_tiny_engine("tiny-small-kv", num_kv_blocks=KV_BLOCKS, block_size=BS, max_model_len=4096)


@contextlib.asynccontextmanager
async def grpc_worker(engine):
    """A real gRPC server over ``engine``; yields the router's client of it."""
    servicer = WorkerServicer(engine)
    server = await start_worker_server(engine, "127.0.0.1", 0, servicer=servicer)
    # first_token_timeout_s well above what the test waits: a hang shows as the test's own failure.
    client = GrpcWorkerClient(engine.worker_id, f"127.0.0.1:{server.bound_port}", connect_timeout_s=1.0,
                              rpc_timeout_s=5.0, first_token_timeout_s=60.0)
    try:
        yield client
    finally:
        servicer.begin_shutdown()
        await server.stop(0)
        await client.close()


@contextlib.asynccontextmanager
async def router(client, tok):
    cfg = RouterConfig(placement="round_robin", health_interval_s=60.0)
    pool = make_pool(cfg)
    pool.add(client)
    app = create_app(cfg, pool, tok)
    host = RouterHost(app, "127.0.0.1", 0, drain_timeout_s=5.0)
    await host.start(30)  # ready: the worker answered healthy
    try:
        yield host.url, app
    finally:
        await asyncio.wait_for(host.stop(), 30)


async def _drain(stream) -> list:
    return [d async for d in stream]


# -- admission: prompt + max_tokens that can never fit the KV cache -------------------------------------


def test_an_over_long_request_is_a_400_and_the_worker_keeps_serving(small_cache_engine, smol_tokenizer):
    prompt = list(range(100, 110))  # 10 tokens

    async def main():
        async with grpc_worker(small_cache_engine) as client, router(client, smol_tokenizer) as (url, app):
            # 20 s: far below the 60 s first-token deadline that answered this request (503) before.
            async with httpx.AsyncClient(base_url=url, timeout=20) as c:
                models = (await c.get("/v1/models")).json()
                assert models["data"][0]["max_model_len"] == CAPACITY  # the router knows the limit
                r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 200})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
                # The next trivial requests are served, and the worker never left placement.
                for _ in range(2):
                    r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    assert r.json()["usage"]["completion_tokens"] == 3
                # Unset max_tokens: the room the cache leaves, never more (it finishes, no hang).
                r = await c.post("/v1/completions", json={"prompt": prompt, "ignore_eos": True})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] <= CAPACITY - len(prompt)
                assert (await c.get("/ready")).status_code == 200
            state = app.state.ctx.pool.state("tiny-small-kv")
            assert state.healthy and state.missed_polls == 0

    asyncio.run(main())
    small_cache_engine.engine.kv_cache.check_no_leak()


def test_the_worker_refuses_what_cannot_fit_as_invalid_argument_naming_the_field(small_cache_engine):
    """The engine's own admission, over gRPC: the router may not know the limit (an older router)."""

    async def refused(client, req):  # a refusal answers at once; before, this waited for a deadline
        return await asyncio.wait_for(_drain(client.generate(req)), 20)

    async def main():
        async with grpc_worker(small_cache_engine) as client:
            too_long = GenerateRequest("too-long", tuple(range(100, 110)), SamplingParams(max_tokens=200))
            with pytest.raises(InvalidParam) as err:
                await refused(client, too_long)
            assert err.value.field == "max_tokens" and f"at most {CAPACITY} tokens" in str(err.value)
            huge_prompt = GenerateRequest("huge", tuple(range(100, 100 + CAPACITY)), SamplingParams(max_tokens=1))
            with pytest.raises(InvalidParam) as err:
                await refused(client, huge_prompt)
            assert err.value.field == "prompt"
            unset = GenerateRequest("unset", (1, 2, 3), SamplingParams(max_tokens=None))
            with pytest.raises(InvalidParam, match="max_tokens: unset") as err:
                await refused(client, unset)
            assert await client.health()
            ok = GenerateRequest("fits", (1, 2, 3), SamplingParams(max_tokens=CAPACITY - 3, ignore_eos=True))
            deltas = [d async for d in client.generate(ok)]
            assert deltas[-1].finish_reason == "length"
            assert sum(len(d.token_ids) for d in deltas) == CAPACITY - 3

    asyncio.run(main())


def test_engine_admission_names_the_field_and_the_limit(small_cache_engine):
    engine = small_cache_engine.engine
    assert engine.max_request_len == CAPACITY and small_cache_engine.info().max_model_len == CAPACITY
    engine.validate(list(range(10)), SamplingParams(max_tokens=CAPACITY - 10))  # exactly fits
    with pytest.raises(InvalidParam, match=rf"<= {CAPACITY - 10} for this prompt") as err:
        engine.validate(list(range(10)), SamplingParams(max_tokens=CAPACITY - 9))
    assert err.value.field == "max_tokens"


# -- health: no flapping ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_step_watch_judges_only_work_in_progress():
    clock = FakeClock()
    watch = StepWatch(clock)
    clock.now += 10_000  # an idle loop, however long: alive
    assert not watch.stuck(120)
    watch.begin()  # a long step ...
    clock.now += 119
    assert not watch.stuck(120) and watch.busy_for() == 119  # ... within the bound: alive, no flap
    watch.idle()
    clock.now += 500
    assert not watch.stuck(120)
    watch.begin()
    clock.now += 120  # a step that ran past the bound: wedged
    assert watch.stuck(120)
    watch.begin()  # the next step starts a fresh count
    assert not watch.stuck(120)


class FlakyHealth(LocalWorker):
    """A real in-process worker whose next health answers are scripted: "miss" (no answer in time),
    False (answers unhealthy), or None (the engine's own answer)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.script: list = []

    async def health(self) -> bool:
        step = self.script.pop(0) if self.script else None
        if step == "miss":
            raise TimeoutError("health answer took longer than health_timeout_s")
        if step is False:
            return False
        return await super().health()


def test_pool_health_does_not_flap_on_missed_polls_but_leaves_on_an_unhealthy_answer(make_tiny_engine):
    engine = make_tiny_engine("tiny-flaky")

    async def main():
        worker = FlakyHealth(engine)
        pool = WorkerPool(make_policy("round_robin"), unhealthy_after_misses=3, clock=FakeClock())
        assert await pool.add_worker(worker)
        state = pool.state("tiny-flaky")
        worker.script = ["miss", "miss", None, "miss", "miss"]
        for _ in range(5):  # slow answers now and then (a long step holding the GIL): stays placeable
            await pool.poll_once()
            assert state.healthy and pool.has_healthy()
        assert state.missed_polls == 2
        worker.script = ["miss"]  # the third in a row: a hung worker leaves placement
        await pool.poll_once()
        assert not state.healthy and "TimeoutError" in state.last_error
        await pool.poll_once()  # it answers again: back, with a fresh count
        assert state.healthy and state.missed_polls == 0
        worker.script = [False]  # it says it is unhealthy: out at once
        await pool.poll_once()
        assert not state.healthy
        await pool.close()

    asyncio.run(main())


def test_only_a_worker_that_is_down_leaves_placement_on_a_request_error():
    assert shows_worker_down(WorkerUnavailable("w", "connection refused", code="UNAVAILABLE"))
    assert not shows_worker_down(WorkerUnavailable("w", "no first token within 60 s", code="DEADLINE_EXCEEDED"))
    assert not shows_worker_down(WorkerUnavailable("w", "bad handle", code="INTERNAL"))
    assert not shows_worker_down(InvalidParam("max_tokens", "max_tokens: too many"))
    assert not shows_worker_down(ValueError("prompt: too long"))
    assert not shows_worker_down(RuntimeError("a bug in the router"))


# -- written once: the n fan-out and the stop-string rule ------------------------------------------------


def test_sibling_params_and_the_stop_rule_are_the_engines_and_the_routers(smol_tokenizer):
    params = SamplingParams(n=3, seed=7, max_tokens=4)
    assert [sibling_params(params, i).seed for i in range(3)] == [7, 8, 9]
    assert all(sibling_params(params, i).n == 1 for i in range(3))
    one = SamplingParams(max_tokens=4)
    assert sibling_params(one, 0) is one

    from shoal.workers.engine.detokenizer import IncrementalDetokenizer

    ids = smol_tokenizer.encode(" hello world again")
    stop = SamplingParams(stop=["world"], max_tokens=len(ids))
    state = CompletionState(IncrementalDetokenizer(smol_tokenizer, [1], stop))
    # The engine also ends it (length) in the same delta: the stop string wins, as vLLM has it.
    assert state.update(ids, "length") == "world"
    assert (state.finish_reason, state.stop_reason) == ("stop", "world")
    assert state.text(delta=False) == " hello "
    assert state.update([5], "length") is None and state.num_tokens == len(ids)  # nothing after the finish
