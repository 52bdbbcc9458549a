"""``max_open_per_worker``: with every worker full the router holds a request (not a worker queue) and
places it on the first worker with room; none within queue_timeout_s is a 503 with Retry-After; without
the limit nothing is held. Real tiny engines behind the router's own host on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from shoal.router.local_worker import LocalWorker
from shoal.router.placement import PlacementRequest, make_policy
from shoal.router.worker_pool import WorkerPool

from .test_app import busy, wait_until

LONG = {"max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def engines(make_tiny_engine):
    return make_tiny_engine("room-a"), make_tiny_engine("room-b")


def post(url: str, body: dict, out: list, timeout: float = 60.0) -> threading.Thread:
    def run():
        out.append(httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", **body},
                              timeout=timeout))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_request_waits_at_the_router_for_a_worker_with_room(engines, smol_tokenizer, serve):
    a, _ = engines
    url, app = serve([a], smol_tokenizer, served_model_name="tiny", max_open_per_worker=1, queue_timeout_s=30)
    first, second = [], []
    t1 = post(url, LONG, first)
    assert wait_until(lambda: busy(a))
    t2 = post(url, {"max_tokens": 2}, second)
    room = app.state.ctx.room
    assert wait_until(lambda: room.held == 1)  # held at the router while the one worker is full
    assert not a.engine.core.scheduler.waiting  # ... not queued on the worker
    t1.join(60)
    t2.join(60)
    assert first[0].status_code == 200 and second[0].status_code == 200
    assert room.held == 0


def test_no_room_within_queue_timeout_is_a_503_with_retry_after(engines, smol_tokenizer, serve):
    a, _ = engines
    url, app = serve([a], smol_tokenizer, served_model_name="tiny", max_open_per_worker=1, queue_timeout_s=0.3,
                     retry_after_s=3)
    first = []
    t1 = post(url, LONG, first)
    assert wait_until(lambda: busy(a))
    resp = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "3"
    assert resp.json()["error"]["code"] == "workers_full" and "max_open_per_worker (1)" in resp.text
    assert app.state.ctx.admission.running <= 1  # the refused request gave its slot back
    t1.join(60)
    assert first[0].status_code == 200


def test_without_a_limit_nothing_is_held(engines, smol_tokenizer, serve):
    a, _ = engines
    url, app = serve([a], smol_tokenizer, served_model_name="tiny")
    first, second = [], []
    t1 = post(url, LONG, first)
    assert wait_until(lambda: busy(a))
    t2 = post(url, {"max_tokens": 2}, second)
    t2.join(60)
    assert second[0].status_code == 200 and app.state.ctx.room.held == 0
    t1.join(60)


def test_rank_puts_full_workers_last_in_the_policy_order(engines):
    a, b = engines
    pool = WorkerPool(make_policy("round_robin"), max_open_per_worker=1)
    for engine in (a, b):
        pool.add(LocalWorker(engine))
    asyncio.run(pool.poll_once())  # both answer: healthy, idle
    req = PlacementRequest("r", (1, 2, 3))
    pool.acquire("room-a")
    assert pool.has_room()
    assert pool.rank(req)[-1] == "room-a"
    pool.acquire("room-b")
    assert not pool.has_room() and set(pool.rank(req)) == {"room-a", "room-b"}  # still ranked: soft limit
    pool.release("room-a")
    assert pool.rank(req)[0] == "room-a"
    with pytest.raises(ValueError, match="max_open_per_worker"):
        WorkerPool(make_policy("round_robin"), max_open_per_worker=-1)


def test_with_no_healthy_worker_nothing_is_held_for_room(smol_tokenizer, serve):
    url, app = serve([], smol_tokenizer, served_model_name="tiny", max_open_per_worker=1, queue_timeout_s=30)
    resp = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_worker"  # at once, not in 30 s
    assert app.state.ctx.room.held == 0
