"""The router over HTTP (httpx) with real engines: errors, limits, overload, failures, disconnects,
placement, metrics, tokenize; and the worker pool's membership and KV-event subscriptions.

Engines here are "tiny" (random weights, SmolLM2's vocabulary, see conftest): their text is noise, so
tests check structure, limits and engine state, never wording (test_openai_client.py does that).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.router.local_worker import LocalWorker
from shoal.router.placement import PlacementRequest, make_policy
from shoal.router.worker_pool import WorkerPool
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest

MAX_LEN = 4096  # the tiny engines' max_model_len (conftest)
LONG = {"max_tokens": 3000, "ignore_eos": True}  # seconds of decoding on a tiny engine


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def metric(url: str, name: str, **labels) -> float:
    """The value of one sample in the router's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sse_data(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def busy(engine) -> bool:
    return engine.engine.core.has_unfinished_requests()


@pytest.fixture(scope="module")
def tiny(make_tiny_engine):
    return make_tiny_engine("tiny-a")


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


# -- bad input, limits, overload ------------------------------------------------------------------------


class CountingWorker(LocalWorker):
    """A real ``LocalWorker`` that counts the requests handed to it: proof that nothing reached it."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.generate_calls = 0

    def generate(self, req):
        self.generate_calls += 1
        return super().generate(req)


def test_bad_requests_get_openai_errors_naming_the_field(serve, tiny, tok):
    worker = CountingWorker(tiny)
    url, _ = serve([worker], tok, max_n=4, max_body_bytes=64 * 1024, served_model_name="tiny")
    # Nor may the engine's own count of admitted prompt tokens (its scheduler's prefix lookups) move.
    queries_before = tiny.load().num_prefix_queries
    cases = [
        ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature", "2"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p", "0"),
        ("/v1/completions", {"prompt": "hi", "n": 5}, "n", "4"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "1"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens", str(MAX_LEN)),
        ("/v1/completions", {"prompt": [5] * MAX_LEN}, "prompt", str(MAX_LEN - 1)),
        ("/v1/completions", {"prompt": [60000]}, "prompt", "49152"),
        ("/v1/completions", {"prompt": ""}, "prompt", "empty"),
        ("/v1/completions", {"max_tokens": 3}, "prompt", "required"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, "min_tokens", "2"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options",
         "stream"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": -2.5}, "presence_penalty", "-2"),
        ("/v1/chat/completions", {"messages": []}, "messages", "1"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role",
         "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content.0", "text"),
        ("/v1/completions", {"model": "gpt-5", "prompt": "hi"}, "model", "gpt-5"),
        ("/v1/chat/completions", {"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}, "model",
         "['tiny']"),
    ]
    with httpx.Client(base_url=url, timeout=30) as c:
        for path, body, param, limit in cases:
            r = c.post(path, json={"model": "tiny", **body})
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
            assert limit in err["message"], (body, err)

        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]

        r = c.post("/v1/completions", json={"model": "gpt-5", "prompt": "hi"})
        assert r.json()["error"]["code"] == "model_not_found" and "gpt-5" in r.json()["error"]["message"]

        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * (70 * 1024)})
        assert r.status_code == 413 and "65536" in r.json()["error"]["message"]

        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
    assert worker.generate_calls == 0, "a bad request reached the worker"
    assert tiny.load().num_prefix_queries == queries_before
    assert not busy(tiny)
    # The counter does count: a good request reaches the worker once.
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1},
                      timeout=30).status_code == 200
    assert worker.generate_calls == 1 and tiny.load().num_prefix_queries > queries_before


def test_no_worker_means_503_with_retry_after(serve, tok):
    url, _ = serve([], tok, retry_after_s=3)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["type"] == "service_unavailable"
        assert c.get("/v1/models").json() == {"object": "list", "data": []}


def test_overload_answers_429_with_retry_after_and_the_queue_is_fifo(serve, tiny, tok):
    url, app = serve([tiny], tok, max_concurrent_requests=1, max_waiting_requests=1, retry_after_s=2)
    admission = app.state.ctx.admission
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "hi", "stream": True, **LONG}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)  # generating: it holds the only slot
            queued: dict = {}
            waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(
                f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=30)))
            waiter.start()
            assert wait_until(lambda: admission.waiting == 1)
            assert metric(url, "shoal_router_queue_depth") == 1
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert "max_concurrent_requests" in r.json()["error"]["message"]
        # Closing the first stream frees its slot, which goes to the waiting request.
        waiter.join(30)
        assert queued["r"].status_code == 200
        assert wait_until(lambda: admission.running == 0 and admission.waiting == 0)
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert wait_until(lambda: not busy(tiny))


def test_queue_timeout_is_a_503(serve, tiny, tok):
    url, _ = serve([tiny], tok, max_concurrent_requests=1, max_waiting_requests=4, queue_timeout_s=0.3)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "hi", "stream": True, **LONG}) as first:
            lines = first.iter_lines()
            next(lines)
            r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
            assert "retry-after" in r.headers
    assert wait_until(lambda: not busy(tiny))


def test_request_deadline_aborts_on_the_worker(serve, tiny, tok):
    url, _ = serve([tiny], tok, request_timeout_s=0.5)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", **LONG}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "stream": True, **LONG},
                      timeout=30) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "deadline_exceeded"
    assert wait_until(lambda: not busy(tiny), 5)


# -- disconnects and worker failures --------------------------------------------------------------------


def test_client_disconnect_aborts_the_request_on_its_worker(serve, tiny, tok):
    url, app = serve([tiny], tok)
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Tell me a long story"}], "stream": True, "n": 2,
                **LONG}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            assert busy(tiny)
        # The client closed the stream mid-generation: both children end on the engine.
        assert wait_until(lambda: not busy(tiny), 15), "the engine still runs a request nobody reads"

    # A non-streaming client that gives up (read timeout) also frees the worker.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "hi", **LONG}, timeout=httpx.Timeout(30, read=1.0))
    assert wait_until(lambda: not busy(tiny), 15)
    ctx = app.state.ctx
    assert wait_until(lambda: ctx.admission.running == 0)
    assert all(s.in_flight == 0 for s in ctx.pool.states())
    tiny.engine.kv_cache.check_no_leak()


def test_worker_failing_before_the_first_token_is_retried_on_the_next(serve, make_tiny_engine, tiny, tok):
    doomed = make_tiny_engine("tiny-doomed")
    # No polls after the first: only the failed request itself can show the router that it died.
    url, app = serve([doomed, tiny], tok, policy="round_robin", poll_interval_s=3600)
    doomed.shutdown()
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(3):
            r = c.post("/v1/completions", json={"prompt": f"request {i}", "max_tokens": 3, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
        assert c.get("/ready").status_code == 200
    assert metric(url, "shoal_router_worker_retries_total", worker="tiny-doomed") == 1
    assert not app.state.ctx.pool.state("tiny-doomed").healthy  # out of placement after the failure
    assert metric(url, "shoal_router_worker_healthy", worker="tiny-doomed") == 0


def test_worker_failing_after_the_first_token_ends_the_stream_with_an_error(serve, make_tiny_engine, tok):
    doomed = make_tiny_engine("tiny-doomed-2")
    url, _ = serve([doomed], tok)
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "hi", "stream": True, **LONG},
                      timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        doomed.shutdown()  # the engine dies mid-stream
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    err = json.loads(rest[-2])["error"]
    assert err["type"] == "server_error" and "shut down" in err["message"]


def test_killing_a_worker_mid_stream_fails_only_its_stream_and_takes_it_out(serve, make_tiny_engine, tok):
    doomed, survivor = make_tiny_engine("tiny-k-doomed"), make_tiny_engine("tiny-k-survivor")
    url, app = serve([doomed, survivor], tok, policy="round_robin", poll_interval_s=0.2)
    pool = app.state.ctx.pool
    assert wait_until(lambda: all(s.healthy for s in pool.states()))
    body = {"prompt": "hi", "stream": True, "max_tokens": 120, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 3000}, timeout=30) as dying, \
            httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as living:
        dying_lines, living_lines = dying.iter_lines(), living.iter_lines()
        assert next(line for line in dying_lines if line.startswith("data: "))
        assert next(line for line in living_lines if line.startswith("data: "))
        # Round robin sorts by id: the first stream is on the doomed worker, the second on the survivor.
        assert busy(doomed) and busy(survivor)
        doomed.shutdown()  # the worker dies with one stream on it
        dying_rest = [line[6:] for line in dying_lines if line.startswith("data: ")]
        living_rest = [line[6:] for line in living_lines if line.startswith("data: ")]
    assert dying_rest[-1] == "[DONE]" and json.loads(dying_rest[-2])["error"]["type"] == "server_error"
    # The other stream went on to its natural end, untouched.
    assert living_rest[-1] == "[DONE]"
    assert json.loads(living_rest[-2])["choices"][0]["finish_reason"] == "length"
    assert not any("error" in json.loads(d) for d in living_rest[:-1])

    # The pool takes the dead worker out; from then on every request goes to the survivor, first time.
    assert wait_until(lambda: not pool.state("tiny-k-doomed").healthy, 5)
    placed_on_doomed = pool.state("tiny-k-doomed").num_placed
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(4):
            r = c.post("/v1/completions", json={"prompt": f"after {i}", "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert pool.state("tiny-k-doomed").num_placed == placed_on_doomed
    assert metric(url, "shoal_router_worker_retries_total", worker="tiny-k-doomed") == 0
    assert metric(url, "shoal_router_worker_placements_total", worker="tiny-k-survivor") == 5
    assert wait_until(lambda: not busy(survivor), 5)
    survivor.engine.kv_cache.check_no_leak()


# -- placement ------------------------------------------------------------------------------------------


def test_prefix_aware_sends_a_shared_prefix_to_the_worker_that_caches_it(serve, make_tiny_engine, tok):
    a, b = make_tiny_engine("tiny-pa"), make_tiny_engine("tiny-pb")
    url, app = serve([a, b], tok, policy="prefix_aware")
    policy = app.state.ctx.pool.policy
    prefixes = {
        "tiny-pa": tok.encode("You are a terse assistant for a bakery. " * 12),
        "tiny-pb": tok.encode("Summarise the following railway timetable carefully. " * 12),
    }
    engines = {"tiny-pa": a, "tiny-pb": b}

    async def warm(engine, ids):  # straight on the engine, behind the router's back
        async for _ in engine.generate(GenerateRequest(f"warm-{engine.worker_id}", tuple(ids),
                                                       SamplingParams(temperature=0, max_tokens=1))):
            pass

    for wid, ids in prefixes.items():
        asyncio.run(warm(engines[wid], ids))
        # The router learns it from the worker's KV events, not from its own placements.
        assert wait_until(lambda ids=ids, wid=wid:
                          policy.predicted_cached_tokens(PlacementRequest("q", tuple(ids)), wid) >= 64)

    with httpx.Client(base_url=url, timeout=30) as c:
        for round_ in range(2):
            for ids in prefixes.values():  # cached_tokens >= 64 only where the prefix is: the warmed worker
                suffix = tok.encode(f" Question {round_}: what next?")
                r = c.post("/v1/completions", json={"prompt": ids + suffix, "max_tokens": 2})
                assert r.status_code == 200
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    for wid in prefixes:
        assert metric(url, "shoal_router_worker_placements_total", worker=wid) == 2
    assert metric(url, "shoal_router_prefix_predicted_cached_tokens_total") >= 4 * 64
    assert metric(url, "shoal_router_prefix_hit_rate", source="reported") > 0.5
    # The workers' own counters reach the router with the load polls.
    assert wait_until(lambda: metric(url, "shoal_router_worker_prefix_hit_rate", worker="tiny-pa") > 0)

    # n > 1: the children of one prompt run on one worker, sharing its prefix blocks.
    queries = {w: e.engine.scheduler.stats.num_prefix_queries for w, e in engines.items()}
    ids = tok.encode("An unrelated prompt about the migration of birds over the sea. " * 4)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 2, "n": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    grown = {w: e.engine.scheduler.stats.num_prefix_queries - queries[w] for w, e in engines.items()}
    assert sorted(grown.values()) == [0, 3 * len(ids)], grown


class LossyWorker(LocalWorker):
    """A transport that loses the second KV batch of its first subscription: a ``seq`` gap."""

    subscriptions = 0

    async def kv_events(self):
        self.subscriptions += 1
        lossy, n = self.subscriptions == 1, 0
        async for batch in super().kv_events():
            n += 1
            if lossy and n == 2:
                continue
            yield batch


def test_pool_tracks_health_membership_and_resubscribes_after_a_kv_gap(make_tiny_engine):
    engine = make_tiny_engine("tiny-pool")

    async def main():
        worker = LossyWorker(engine)
        pool = WorkerPool(make_policy("prefix_aware", block_size=16), poll_interval_s=0.05, kv_retry_s=0.05)
        await pool.start()
        assert await pool.add_worker(worker) and pool.has_healthy()
        for _ in range(250):  # the subscription's snapshot first, so the next batch is a's
            if pool.state("tiny-pool").kv_batches:
                break
            await asyncio.sleep(0.02)
        prompt_a, prompt_b = tuple(range(1000, 1040)), tuple(range(2000, 2040))
        for rid, prompt in (("a", prompt_a), ("b", prompt_b)):
            async for _ in worker.generate(GenerateRequest(rid, prompt, SamplingParams(max_tokens=1))):
                pass
            await asyncio.sleep(0.1)

        def cached(prompt):
            return pool.policy.predicted_cached_tokens(PlacementRequest("q", prompt), "tiny-pool")

        for _ in range(100):  # a's batch was lost; the resubscription's snapshot brings it back
            if cached(prompt_a) and cached(prompt_b):
                break
            await asyncio.sleep(0.05)
        assert cached(prompt_a) == 32 and cached(prompt_b) == 32
        assert worker.subscriptions >= 2 and pool.state("tiny-pool").kv_subscriptions >= 2

        # A failed request takes it out of placement until a poll finds it healthy again.
        pool.mark_failed("tiny-pool", "test")
        assert pool.rank(PlacementRequest("r", prompt_a)) == []
        await pool.poll_once()
        assert pool.rank(PlacementRequest("r", prompt_a)) == ["tiny-pool"]

        await pool.remove_worker("tiny-pool")
        assert pool.views() == [] and not pool.has_healthy() and cached(prompt_a) == 0
        await pool.close()

    asyncio.run(main())
    assert not busy(engine)


# -- utility endpoints ----------------------------------------------------------------------------------


def test_tokenize_detokenize_models_and_metrics(serve, tiny, tok):
    url, _ = serve([tiny], tok, served_model_name="tiny")
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == MAX_LEN and r["token_strs"][-1] == "Ġworld"
        msgs = [{"role": "user", "content": "Hi"}]
        r = c.post("/tokenize", json={"messages": msgs}).json()
        assert r["tokens"] == tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
        assert c.post("/detokenize", json={"tokens": tok.encode("Hello world")}).json() == {"prompt": "Hello world"}
        r = c.post("/detokenize", json={"tokens": [10**6]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        assert c.post("/tokenize", json={}).status_code == 400

        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == MAX_LEN

        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
        with c.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "stream": True,
                                                       "ignore_eos": True}) as s:
            assert sse_data(s)[-1] == "[DONE]"
        # A stream is counted when its response ends on the server, which may be just after the
        # client read [DONE]: give the count a moment.
        deadline = time.monotonic() + 5
        while True:
            text = c.get("/metrics").text
            if 'endpoint="completions",status="200"} 2.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    for series in ('shoal_router_requests_total{endpoint="completions",status="200"} 2.0',
                   'shoal_router_worker_running_requests{worker="tiny-a"}',
                   'shoal_router_worker_kv_usage{worker="tiny-a"}',
                   'shoal_router_prefix_hit_rate{source="predicted"}',
                   "shoal_router_requests_in_flight 0.0", "shoal_router_queue_depth 0.0"):
        assert series in text, series
    assert metric(url, "shoal_router_time_to_first_token_seconds_count", endpoint="completions") == 2
    assert metric(url, "shoal_router_inter_token_seconds_count", endpoint="completions") == 4
    assert metric(url, "shoal_router_request_duration_seconds_count", endpoint="completions") == 2
    assert metric(url, "shoal_router_generation_tokens_total") == 6


def test_the_router_does_not_import_torch():
    code = ("import sys, shoal.router.app, shoal.router.worker_pool, shoal.router.local_worker, "
            "shoal.router.metrics; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
