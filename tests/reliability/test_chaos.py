"""Chaos against real processes: ``shoal serve`` with two tiny workers, and an ``EtcdRouter`` following
workers registered in a real etcd. (A worker SIGKILLed mid-stream and the SIGTERM drain are
tests/cluster/test_serve_lifecycle.py's.)

After each: the workload's KV blocks are all back (``shoal:kv_blocks_in_use`` 0 on every worker, read
from the router's ``/metrics``), every process the test started is gone (reaped, no zombie) and no
port it listened on is still bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.cluster.serve_support import TINY, Served, sse_events, start_serve, wait_gone, wait_until, worker_pids
from tests.reliability.support import (kv_blocks_in_use, listening_ports, port_is_free, wait_kv_blocks_free,
                                       worker_id_of)

MODEL = "tiny-smollm2-vocab"
HANG_TIMEOUT_S = 3


def complete(base: str, max_tokens: int = 2, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=timeout,
                      json={"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens})


def running_per_worker(base: str) -> dict[str, float]:
    """worker id -> ``vllm:num_requests_running``, from the router's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {s.labels["worker"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "vllm:num_requests_running" and "worker" in s.labels}


class Tracked:
    """What a ``shoal serve`` had running: its pid, its workers' pids and every port they listened on,
    so the test can check afterwards that all of it is gone."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.pids: set[int] = {served.proc.pid}
        self.ports: set[int] = set()
        self.update()

    def update(self) -> list[int]:
        workers = worker_pids(self.served.proc)
        for pid in [self.served.proc.pid, *workers]:
            self.pids.add(pid)
            try:
                self.ports |= listening_ports(pid)
            except FileNotFoundError:  # exited between the listing and the look
                pass
        return workers

    def stop_and_check(self) -> None:
        assert self.served.stop() == 0, self.served.output()[-3000:]
        assert wait_gone(sorted(self.pids), 30), [p for p in self.pids if os.path.exists(f"/proc/{p}")]
        assert self.ports, "no listening port was seen"
        still = sorted(p for p in self.ports if not port_is_free(p))
        assert not still, f"ports still bound after shoal serve stopped: {still}"


@pytest.fixture
def serve2():
    """``shoal serve`` with 2 tiny workers (round robin, hang timeout 3 s); stopped and checked after."""
    served = start_serve(*TINY, "--workers", "2", "--policy", "round_robin", "--hang-timeout", str(HANG_TIMEOUT_S),
                         "--health-interval-s", "0.5", "--health-timeout-s", "1")
    tracked = Tracked(served)
    try:
        yield tracked
    except BaseException:
        served.stop()
        raise
    tracked.stop_and_check()


# -- a worker SIGSTOPped ---------------------------------------------------------------------------------


def test_a_sigstopped_worker_is_left_out_killed_and_restarted_and_its_stream_ends_with_an_error(serve2):
    served = serve2.served
    base = served.base
    by_id = {worker_id_of(p): p for p in serve2.update()}
    assert set(by_id) == {"worker-0", "worker-1"}
    with httpx.Client(timeout=httpx.Timeout(60, read=30)) as client:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
                "ignore_eos": True}
        with client.stream("POST", f"{base}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            running = wait_until(lambda: {w for w, n in running_per_worker(base).items() if n >= 1}, 10,
                                 "the stream to show as running on a worker")
            [hung] = running
            other = ({"worker-0", "worker-1"} - {hung}).pop()
            hung_pid = by_id[hung]
            os.kill(hung_pid, signal.SIGSTOP)
            try:
                # Requests keep succeeding: placed on the other worker (one placed on the hung worker
                # before its health poll failed is retried there when the supervisor kills it).
                for _ in range(12):
                    r = complete(base, timeout=60)
                    assert r.status_code == 200, r.text
                events = sse_events(lines)  # the hung worker's stream must end: an error event, then [DONE]
            finally:
                if os.path.exists(f"/proc/{hung_pid}"):
                    os.kill(hung_pid, signal.SIGCONT)  # never leave a stopped process behind
    assert events and events[-1] == "[DONE]", events[-3:]
    assert "error" in events[-2], events[-3:]
    out = wait_until(lambda: "killing it" in served.output() and served.output(), 30, "the hang to be reported")
    assert f"worker {hung} answered no health check for {HANG_TIMEOUT_S} s (--hang-timeout); killing it" in out
    assert wait_gone([hung_pid], 30), "the hung worker was not killed and reaped"
    # It comes back under the same id, in a new process, and is placed again.
    new_pid = wait_until(lambda: next((p for p in worker_pids(served.proc) if p != by_id[other]
                                       and p != hung_pid), None), 60, "a new process for the hung worker")
    assert worker_id_of(new_pid) == hung
    serve2.update()
    wait_until(lambda: f"worker {hung} is back on" in served.output(), 60, "the worker to rejoin")
    wait_until(lambda: all(s.get("healthy") for s in _pool_states(base).values()) and len(_pool_states(base)) == 2,
               30, "both workers healthy")
    before = _placements(base)
    for _ in range(6):
        r = complete(base)
        assert r.status_code == 200, r.text
    after = _placements(base)
    assert {w for w in after if after[w] > before.get(w, 0)} == {"worker-0", "worker-1"}, (before, after)
    wait_kv_blocks_free(base, {"worker-0", "worker-1"})


def _pool_states(base: str) -> dict[str, dict]:
    """worker id -> {"healthy": bool}, from the router's worker gauge in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "shoal_router_worker_healthy" and "worker" in s.labels:
                out[s.labels["worker"]] = {"healthy": s.value == 1}
    return out


def _placements(base: str) -> dict[str, float]:
    """worker id -> prompts the router placed on it so far."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {s.labels["worker"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "shoal_router_worker_placements_total"}


# -- a client dropping 100 streams at once ---------------------------------------------------------------


async def _open_then_drop(base: str, count: int) -> dict[str, float]:
    """Open ``count`` streams, wait until every one has its first token, read the KV blocks in use,
    then drop them all at once (each connection closed mid-stream); -> the blocks in use before."""
    started, drop = asyncio.Semaphore(0), asyncio.Event()
    # 4000 tokens each, 50 a worker, on 256 KV blocks a worker: none can finish before the drop.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=60), limits=limits) as client:

        async def one() -> None:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
                assert response.status_code == 200
                # Held in a name: an async generator dropped after `break` is closed when collected,
                # and that would close the stream now, one at a time, instead of at the drop.
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        assert "error" not in line, line
                        break
                started.release()
                await drop.wait()  # leaving the block closes the connection with the stream still open

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        try:
            async with asyncio.timeout(120):
                for _ in range(count):
                    await started.acquire()
            in_use = await asyncio.to_thread(kv_blocks_in_use, base)
            drop.set()
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return in_use


def test_a_client_dropping_100_streams_at_once_frees_every_kv_block(serve2):
    base = serve2.served.base
    in_use = asyncio.run(_open_then_drop(base, 100))
    assert set(in_use) == {"worker-0", "worker-1"} and all(n > 0 for n in in_use.values()), in_use
    wait_kv_blocks_free(base, {"worker-0", "worker-1"}, timeout=30)
    wait_until(lambda: not any(running_per_worker(base).values()), 30, "no request left running on a worker")
    for _ in range(4):
        r = complete(base)
        assert r.status_code == 200, r.text
    serve2.update()


# -- etcd stopped while an EtcdRouter serves --------------------------------------------------------------

ETCD_TTL_S = 2  # the workers' lease TTL (etcd's minimum with the embedded server is below it)
OUTAGE_S = ETCD_TTL_S + 3  # etcd stays down longer than a lease lives: not 60 s, to keep the test short
DEPLOY = "chaos-etcd"
ENGINE = ["--model", MODEL, "--load-format", "dummy", "--device", "cpu", "--num-kv-blocks", "128"]


def etcd_spec(endpoint: str):
    from shoal.cluster.spec import DeploymentSpec
    from shoal.workers.models.files import smollm2_path

    return DeploymentSpec.from_dict({
        "name": DEPLOY, "model": MODEL,
        "pools": {"unified": {"replicas": 2, "engine": {"tokenizer": str(smollm2_path()), "load_format": "dummy",
                                                        "device": "cpu", "num_kv_blocks": 128}}},
        "router": {"policy": "round_robin", "port": 8000},
        "etcd": {"endpoints": endpoint}})


async def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _serve_through_etcd_outage(etcd, workers, ports: set[int]) -> None:
    from shoal.cluster.etcd_router import EtcdRouter
    from shoal.cluster.registry import WorkerRegistration, connect, list_workers
    from shoal.router.worker_client import GrpcWorkerClient

    spec = etcd_spec(etcd.endpoint)
    ids = {w.worker_id for w in workers}
    # The registrations are what each worker's host keeps in production (cluster/ray_worker.py): a
    # lease kept alive from its own etcd client, not the router's.
    reg_client = await connect(etcd.endpoint)
    router_client = await connect(etcd.endpoint)
    check_client = await connect(etcd.endpoint)
    regs: dict[str, WorkerRegistration] = {}
    router = EtcdRouter(spec, router_client, host="127.0.0.1", port=0, health_interval_s=0.3, ready_timeout_s=60,
                        drain_timeout_s=5)
    try:
        infos = {}
        for w in workers:
            handle = GrpcWorkerClient(w.worker_id, w.endpoint)
            try:
                infos[w.worker_id] = await handle.get_info()
            finally:
                await handle.close()
        for w in workers:
            regs[w.worker_id] = await WorkerRegistration(reg_client, DEPLOY, infos[w.worker_id], w.endpoint,
                                                         ttl_s=ETCD_TTL_S).start()
        port = await router.start()
        ports.add(port)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> set[str]:
            return {s.worker_id for s in router.pool.states() if s.healthy}

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            async def ok() -> None:
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
                assert r.status_code == 200, r.text

            await _until(lambda: healthy() == ids, 30, "both workers healthy in the router")
            for _ in range(4):
                await ok()

            await asyncio.to_thread(etcd.stop)
            served_during = 0
            deadline = time.monotonic() + OUTAGE_S
            while time.monotonic() < deadline:  # serving continues on the last membership
                await ok()
                served_during += 1
                await asyncio.sleep(0.05)
            assert healthy() == ids, "the router dropped a worker while etcd was down"
            assert served_during > 0

            await asyncio.to_thread(etcd.start, 20.0)
            # The workers are members again (their keys are back) and the watch follows etcd again.
            async def members() -> dict:
                try:
                    return {r.worker_id: r.endpoint for r in await list_workers(check_client, DEPLOY)}
                except Exception:  # noqa: BLE001 - the client reconnects to the restarted etcd
                    return {}
            expected = {w.worker_id: w.endpoint for w in workers}
            await _until(lambda: _eq(members(), expected), 30, "the workers to be registered again")
            assert all(reg.alive for reg in regs.values())
            await _until(lambda: router.watcher.connected, 30, "the router's watch to reconnect")
            for _ in range(4):
                await ok()
            # Membership is followed again: a worker that leaves etcd leaves placement, and rejoins.
            gone = sorted(ids)[1]
            await regs.pop(gone).deregister()
            await _until(lambda: gone not in {s.worker_id for s in router.pool.states()}, 30,
                         f"{gone} to leave the router's pool")
            for _ in range(4):
                await ok()
            regs[gone] = await WorkerRegistration(reg_client, DEPLOY, infos[gone], expected[gone],
                                                  ttl_s=ETCD_TTL_S).start()
            await _until(lambda: healthy() == ids, 30, f"{gone} to rejoin the router's pool")
            await ok()
            await _until(lambda: _all_zero(http), 30, "0 KV blocks in use on both workers")
    finally:
        await router.stop()
        for reg in regs.values():
            await reg.deregister()
        for c in (reg_client, router_client, check_client):
            if c is not None:
                await c.close()


async def _eq(coro, expected) -> bool:
    return await coro == expected


async def _all_zero(http: httpx.AsyncClient) -> bool:
    seen = await asyncio.to_thread(kv_blocks_in_use, str(http.base_url).rstrip("/"))
    return len(seen) == 2 and not any(seen.values())


def test_serving_continues_through_an_etcd_outage_and_workers_register_again(etcd_server):
    """etcd is stopped for ``OUTAGE_S`` (the lease TTL + 3 s, rather than a minute, so the test stays
    short: what matters is that the workers' leases would have expired), while an ``EtcdRouter``
    serves two real worker processes registered in it."""
    from shoal.cluster.worker_process import WorkerProcess

    workers = [WorkerProcess(f"etcd-w{i}", ENGINE) for i in range(2)]
    pids: set[int] = set()
    ports: set[int] = set()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(120)
            pids.add(w.pid)
            ports |= listening_ports(w.pid)
        asyncio.run(asyncio.wait_for(_serve_through_etcd_outage(etcd_server, workers, ports), 240))
    finally:
        for w in workers:
            w.stop()
    etcd_pid = etcd_server.pid
    ports |= {etcd_server.client_port, etcd_server.peer_port}
    etcd_server.stop()
    assert wait_gone(sorted(pids | {etcd_pid}), 30)
    still = sorted(p for p in ports if not port_is_free(p))
    assert not still, f"ports still bound: {still}"
