"""A worker that leaves the pool (its etcd key went: drained by a scale-down) keeps its gRPC channel for
the calls still open on it when removed with a grace; without one, they are cut at once. A real tiny
engine behind a real gRPC server and a real ``GrpcWorkerClient``."""

from __future__ import annotations

import asyncio

from shoal.router.config import RouterConfig
from shoal.router.worker_client import GrpcWorkerClient
from shoal.router.worker_pool import WorkerUnavailable, make_pool
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest
from shoal.workers.rpc.servicer import start_worker_server


async def stream_across_removal(pool, client: GrpcWorkerClient, grace_s: float) -> str:
    """Open a call, remove the worker mid-stream, read on: -> its finish reason or ``cut: <why>``."""
    pool.add(client)
    pool.acquire(client.worker_id)  # what the router's child does around a call
    req = GenerateRequest(f"{client.worker_id}-r", tuple(range(1, 9)),
                          SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    stream = client.generate(req)
    try:
        first = await anext(stream)
        assert first.finish_reason is None
        await pool.remove_worker(client.worker_id, grace_s=grace_s)
        assert client.worker_id not in pool  # out of placement at once, either way
        async for delta in stream:
            if delta.finish_reason is not None:
                return delta.finish_reason
        return "ended without a finish reason"
    except WorkerUnavailable as e:
        return f"cut: {e}"
    finally:
        pool.release(client.worker_id)


def test_removal_with_a_grace_lets_open_calls_finish_and_without_one_cuts_them(make_tiny_engine):
    engine = make_tiny_engine("leaving-0")

    async def main():
        server = await start_worker_server(engine, "127.0.0.1", 0)
        endpoint = f"127.0.0.1:{server.bound_port}"
        pool = make_pool(RouterConfig(placement="round_robin"))
        try:
            kept = await stream_across_removal(pool, GrpcWorkerClient("graced", endpoint), grace_s=30.0)
            cut = await stream_across_removal(pool, GrpcWorkerClient("cut", endpoint), grace_s=0.0)
            return kept, cut
        finally:
            await pool.close()
            await server.stop(0)

    kept, cut = asyncio.run(main())
    assert kept == "length"
    assert cut.startswith("cut:") and "channel was closed" in cut
