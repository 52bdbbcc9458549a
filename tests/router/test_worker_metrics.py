"""The router's ``/metrics`` carries every worker's own series (vLLM's names), labelled ``worker="<id>"``.

Real components: tiny engines, one behind a real gRPC server (``GetMetrics``) and one in process
(``LocalWorker``), a real router on uvicorn. A worker that cannot answer is left out of the scrape
and counted; the router's own series stay as they were.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shoal.router.local_worker import LocalWorker
from shoal.router.metrics import merge_worker_series
from shoal.router.worker_client import GrpcWorkerClient
from shoal.workers.rpc.servicer import start_worker_server

FAILURES = "shoal_router_worker_metrics_failures_total"


class GrpcWorkerThread:
    """A real gRPC worker server for ``engine`` on 127.0.0.1 and a free port, on its own event loop."""

    def __init__(self, engine):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="grpc-worker")

    def __enter__(self) -> str:
        self.thread.start()
        start = asyncio.run_coroutine_threadsafe(start_worker_server(self.engine, "127.0.0.1", 0), self.loop)
        self.server = start.result(30)  # returns once the server listens
        return f"127.0.0.1:{self.server.bound_port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def samples(text: str):
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def value(text: str, name: str, **labels) -> float:
    found = [s.value for s in samples(text) if s.name == name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def wait_ready(url: str, healthy: int) -> None:
    """Until the router's own /ready counts ``healthy`` workers in placement."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{url}/ready", timeout=10)
        if r.status_code == 200 and r.json()["healthy_workers"] == healthy:
            return
        assert time.monotonic() < deadline, f"router not ready with {healthy} workers: {r.text}"
        time.sleep(0.05)


def test_router_metrics_carry_each_workers_series(serve, make_tiny_engine, smol_tokenizer):
    remote, local = make_tiny_engine("wm-grpc"), make_tiny_engine("wm-local")
    with GrpcWorkerThread(remote) as endpoint:
        url, _ = serve([GrpcWorkerClient("wm-grpc", endpoint), LocalWorker(local)], smol_tokenizer,
                       policy="round_robin", served_model_name="tiny")
        wait_ready(url, healthy=2)
        usage = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for prompt in ("one two three", "four five", "six seven eight nine", "ten"):
                r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3,
                                                    "ignore_eos": True})
                assert r.status_code == 200, r.text
                usage.append(r.json()["usage"])
            text = c.get("/metrics").text

    workers = ("wm-grpc", "wm-local")
    for w in workers:  # round robin: two requests each
        assert value(text, "vllm:e2e_request_latency_seconds_count", worker=w) == 2
        assert value(text, "vllm:request_success_total", worker=w, finished_reason="length") == 2
        assert value(text, "vllm:num_requests_running", worker=w) == 0
        assert value(text, "shoal:kv_blocks_in_use", worker=w) == 0
        assert value(text, "shoal:kv_blocks_total", worker=w) == 512
    assert value(text, "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert value(text, "vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage) == 12
    assert not any(s.name == FAILURES for s in samples(text)), "no worker scrape failed"
    # every worker sample is labelled with its worker; each family's HELP/TYPE appears once
    assert {s.labels.get("worker") for s in samples(text) if s.name.startswith(("vllm:", "shoal:"))} == set(workers)
    for family in ("vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds", "shoal:kv_blocks_in_use"):
        assert text.count(f"# TYPE {family} ") == 1 and text.count(f"# HELP {family} ") == 1, family
    # the router's own series are still there, unchanged in name
    assert value(text, "shoal_router_requests_total", endpoint="completions", status="200") == 4
    assert value(text, "shoal_router_worker_healthy", worker="wm-grpc") == 1


def test_a_worker_that_does_not_answer_is_skipped_and_counted(serve, make_tiny_engine, smol_tokenizer):
    live = make_tiny_engine("wm-live")
    # a worker whose port accepts connections and never speaks: its GetMetrics can only time out
    mute = socket.create_server(("127.0.0.1", 0))
    try:
        hung = GrpcWorkerClient("wm-hung", f"127.0.0.1:{mute.getsockname()[1]}", connect_timeout_s=1,
                                rpc_timeout_s=5)
        # and one where nothing listens at all: refused at once
        with socket.create_server(("127.0.0.1", 0)) as s:
            closed_port = s.getsockname()[1]
        gone = GrpcWorkerClient("wm-gone", f"127.0.0.1:{closed_port}", connect_timeout_s=1, rpc_timeout_s=5)
        url, app = serve([LocalWorker(live), hung, gone], smol_tokenizer, served_model_name="tiny")
        app.state.ctx.metrics.worker_scrape_timeout_s = 0.5
        wait_ready(url, healthy=1)
        first = httpx.get(f"{url}/metrics", timeout=30)
        second = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        mute.close()
    assert first.status_code == 200
    for text, n in ((first.text, 1), (second, 2)):
        assert value(text, FAILURES, worker="wm-hung") == n
        assert value(text, FAILURES, worker="wm-gone") == n
        assert value(text, "shoal:kv_blocks_total", worker="wm-live") == 512
        assert {s.labels.get("worker") for s in samples(text) if s.name.startswith("vllm:")} == {"wm-live"}


def test_merge_keeps_one_type_per_family():
    a = list(text_string_to_metric_families("# TYPE x gauge\nx 1\n"))
    b = list(text_string_to_metric_families("# TYPE x_total counter\nx_total 2\n# TYPE y gauge\ny 3\n"))
    text = merge_worker_series({"a": a, "b": b}).decode()
    assert text.count("# TYPE x ") == 1
    assert [(s.name, s.labels, s.value) for s in samples(text)] == [("x", {"worker": "a"}, 1.0),
                                                                     ("y", {"worker": "b"}, 3.0)]
    assert merge_worker_series({}) == b""
