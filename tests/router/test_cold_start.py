"""A request that finds no healthy worker (a pool scaled to zero) is held for ``cold_start_wait_s``
while the router signals demand, then answered 503 with Retry-After if no worker came. The worker
arriving in time is tested end to end on Ray (tests/cluster/test_autoscale_ray.py)."""

from __future__ import annotations

import asyncio
import time

import httpx

from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.worker_pool import make_pool


def ask(config: RouterConfig, tokenizer, demand: list[bool]):
    async def on_demand(held: bool) -> None:
        demand.append(held)

    async def main():
        app = create_app(config, make_pool(config), tokenizer, on_demand=on_demand)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            started = time.monotonic()
            resp = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
            return resp, time.monotonic() - started, await http.get("/ready")

    return asyncio.run(main())


def test_a_held_request_signals_demand_and_gets_503_with_retry_after(smol_tokenizer):
    demand: list[bool] = []
    config = RouterConfig(served_model_name="m", cold_start_wait_s=0.5, retry_after_s=7)
    resp, took, ready = ask(config, smol_tokenizer, demand)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "7"
    assert resp.json()["error"]["code"] == "no_healthy_worker" and "cold_start_wait_s" in resp.text
    assert took >= 0.5 and demand == [True, False]  # demand while held, withdrawn after
    assert ready.status_code == 200 and ready.json()["status"] == "cold"  # stays in the balancer


def test_without_holding_no_worker_is_an_immediate_503(smol_tokenizer):
    demand: list[bool] = []
    resp, took, ready = ask(RouterConfig(served_model_name="m"), smol_tokenizer, demand)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_healthy_worker"
    assert "cold_start_wait_s" not in resp.text and demand == [] and took < 0.5
    assert ready.status_code == 503
