"""Soak: 2,000 requests at saturation through ``shoal serve`` on CPU with the real SmolLM2-135M.

32 clients at once (httpx.AsyncClient), each sending short completions (4-5 tokens) back to back,
so the router's and the worker's queues never run dry. Asserted: 0 lost (every request answered),
0 5xx (no request here is bad, so every answer is a 200), and the resident memory (VmRSS) of the
``shoal serve`` process (the router) and of its worker process grows by less than 5 % between the
end of a warm-up (the first 200 requests: allocator pools, caches and compiled paths settle) and the
end. Then the KV blocks are all back and the server stops cleanly.

Bounded by the count, not by time: 2,000 took 318 s on a 2-core machine that other test runs shared
(load ~5), with 4-8 tokens each; now 4-5 tokens each. It is the suite's longest test (marked slow).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

from tests.cluster.serve_support import start_serve, wait_gone, worker_pids
from tests.reliability.support import rss_kib, wait_kv_blocks_free

pytestmark = pytest.mark.slow

TOTAL, WARMUP, CONCURRENCY = 2000, 200, 32
MAX_RSS_GROWTH = 0.05
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "The sky is",
           "1, 2, 3,", "Water boils at", "My favourite colour is", "Hello, my name is"]


async def _soak(base: str, pids: list[int]) -> tuple[dict[int, int], list, dict[int, int], dict[int, int]]:
    """-> (status counts, failures, RSS after warm-up, RSS at the end) with RSS keyed by pid."""
    statuses: dict[int, int] = {}
    failures: list = []
    done = 0
    warm: dict[int, int] = {}
    numbers = itertools.count()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def one_client() -> None:
            nonlocal done
            while (i := next(numbers)) < TOTAL:
                body = {"model": "smollm2-135m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4 + i % 2,
                        "temperature": 0}
                try:
                    r = await client.post("/v1/completions", json=body)
                except httpx.HTTPError as e:  # no answer at all: lost
                    failures.append((i, repr(e)))
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    failures.append((i, r.status_code, r.text[:300]))
                elif r.json()["usage"]["completion_tokens"] < 1:
                    failures.append((i, "no tokens", r.text[:300]))
                done += 1
                if done == WARMUP:
                    warm.update({pid: rss_kib(pid) for pid in pids})

        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
        end = {pid: rss_kib(pid) for pid in pids}
    return statuses, failures, warm, end


def test_2000_requests_at_saturation_lose_nothing_and_memory_stays_flat():
    served = start_serve("--model", "smollm2-135m", "--workers", "1", "--dtype", "float32")
    try:
        workers = worker_pids(served.proc)
        assert len(workers) == 1
        pids = [served.proc.pid, *workers]
        t0 = time.monotonic()
        statuses, failures, warm, end = asyncio.run(_soak(served.base, pids))
        elapsed = time.monotonic() - t0
        print(f"soak: {TOTAL} requests in {elapsed:.1f} s ({TOTAL / elapsed:.1f}/s); statuses {statuses}; "
              f"RSS KiB after warm-up {warm}, at the end {end}")
        assert sum(statuses.values()) == TOTAL and not failures, (statuses, failures[:10])
        assert statuses == {200: TOTAL}
        for pid in pids:
            growth = (end[pid] - warm[pid]) / warm[pid]
            assert growth < MAX_RSS_GROWTH, f"pid {pid} RSS grew {growth:.1%}: {warm[pid]} -> {end[pid]} KiB"
        wait_kv_blocks_free(served.base, {"worker-0"})
    finally:
        code = served.stop()
    assert code == 0, served.output()[-3000:]
    assert wait_gone(pids, 30)
