"""``RouterHost``'s contract, on a real uvicorn and a real (tiny) engine: it listens before it is
ready (a client is never refused), ``/health`` is liveness and ``/ready`` readiness, a taken port is
one clear error, and a stop drains: new requests 503, running ones finish or end with an error."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import httpx
import pytest

from shoal.router.app import create_app
from shoal.router.config import RouterConfig
from shoal.router.host import RouterHost, StartupError, bind_socket
from shoal.router.local_worker import LocalWorker
from shoal.router.worker_pool import make_pool


def _app(engines, tokenizer):
    cfg = RouterConfig(placement="round_robin", health_interval_s=0.2)
    pool = make_pool(cfg)
    for e in engines:
        pool.add(LocalWorker(e))
    return create_app(cfg, pool, tokenizer)


def test_a_taken_port_is_a_startup_error_naming_it_and_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"cannot listen on 127.0.0.1:{port}: the address is already in "
                                               r"use \(choose another with --port\)"):
            bind_socket("127.0.0.1", port)


def test_it_listens_before_it_is_ready_then_serves(make_tiny_engine, smol_tokenizer):
    async def main():
        host = RouterHost(_app([make_tiny_engine("host-0")], smol_tokenizer), "127.0.0.1", 0)
        await host.listen()
        try:
            async with httpx.AsyncClient(base_url=host.url, timeout=30) as client:
                assert (await client.get("/health")).status_code == 200
                starting = await client.get("/ready")
                assert starting.status_code == 503 and starting.json()["error"]["code"] == "router_starting"
                await host.become_ready(30)
                assert host.serving
                assert (await client.get("/ready")).status_code == 200
                r = await client.post("/v1/completions", json={"model": host.ctx.model_names()[0],
                                                               "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 200, r.text
        finally:
            assert await host.stop() == 0
        assert not host.serving

    asyncio.run(main())


def test_no_healthy_worker_within_the_ready_timeout_is_a_startup_error_and_frees_the_port(smol_tokenizer):
    async def main():
        host = RouterHost(_app([], smol_tokenizer), "127.0.0.1", 0)
        with pytest.raises(StartupError, match="no worker became healthy within 0.3 s"):
            await host.start(0.3)
        port = host.bound[1]
        bind_socket("127.0.0.1", port).close()  # nothing left listening

    asyncio.run(main())


def test_a_drain_refuses_new_requests_and_ends_a_stream_past_its_deadline(make_tiny_engine, smol_tokenizer):
    async def main():
        host = RouterHost(_app([make_tiny_engine("host-1")], smol_tokenizer), "127.0.0.1", 0, drain_timeout_s=0.5)
        await host.start(30)
        model = host.ctx.model_names()[0]
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 3000, "stream": True,
                "ignore_eos": True}
        async with httpx.AsyncClient(base_url=host.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)
                assert first.startswith("data: ")
                stopping = asyncio.ensure_future(host.stop())
                while host.ctx.phase != "draining":
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_shutting_down"
                assert (await client.get("/ready")).json()["error"]["code"] == "router_draining"
                events = [line.removeprefix("data: ") async for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
            assert await stopping == 1  # one request was still running at the drain deadline

    asyncio.run(main())


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_client_that_never_finishes_its_headers_is_disconnected(make_tiny_engine, smol_tokenizer, monkeypatch,
                                                                   parser):
    if parser == "h11":  # as on a machine without httptools (the GPU image): uvicorn's h11 protocol
        monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)

    async def main():
        host = RouterHost(_app([make_tiny_engine(f"host-2-{parser}")], smol_tokenizer), "127.0.0.1", 0,
                          header_timeout_s=0.3)
        await host.start(30)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", host.bound[1])
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, no answer
            writer.close()
            async with httpx.AsyncClient(base_url=host.url) as client:  # and it still serves others
                assert (await client.get("/health")).status_code == 200
                assert (await client.get("/ready")).status_code == 200  # a second request, same connection
        finally:
            await host.stop()

    asyncio.run(main())
