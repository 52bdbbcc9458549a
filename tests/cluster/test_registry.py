"""The etcd control plane against a real etcd (the ``etcd_server`` fixture): leases, watches, restarts."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aetcd
import pytest

from shoal.cluster.etcd import EmbeddedEtcd, find_etcd_binary, free_port, parse_endpoints
from shoal.cluster.registry import (MembershipWatcher, WorkerRecord, WorkerRegistration, connect,
                                    delete_deployment, get_spec, list_deployments, list_workers, put_spec,
                                    worker_key)
from shoal.cluster.spec import DeploymentSpec, load_spec
from shoal.workers.protocol import WorkerInfo

DEPLOY = "demo"
TTL = 2  # seconds: etcd's minimum with the embedded server's 500 ms election timeout is below it
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "deploy.yaml"


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def info(worker_id: str, role: str = "unified") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, model="smollm2-135m", block_size=16, max_model_len=2048, role=role)


async def until(predicate, timeout: float) -> None:
    """Poll ``predicate`` (the registration's own bookkeeping lags its put by one await)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class Log:
    """Callbacks that record (kind, worker_id, time) in order; on_add is async, on_remove plain."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []

    async def on_add(self, record: WorkerRecord) -> None:
        self.events.append(("add", record.worker_id, time.monotonic()))

    def on_remove(self, worker_id: str) -> None:
        self.events.append(("remove", worker_id, time.monotonic()))

    def of(self, worker_id: str) -> list[str]:
        return [kind for kind, w, _ in self.events if w == worker_id]


def watcher_for(client, log: Log) -> MembershipWatcher:
    return MembershipWatcher(client, DEPLOY, on_add=log.on_add, on_remove=log.on_remove, retry_max_s=0.5)


# -- the embedded server and endpoints ------------------------------------------------------------

def test_embedded_etcd_starts_answers_and_leaves_no_process(tmp_path):
    assert os.access(find_etcd_binary(), os.X_OK)
    with EmbeddedEtcd(tmp_path / "data") as server:
        pid = server.pid
        assert server.client_port and server.peer_port and server.client_port != server.peer_port
        assert server.endpoint == f"127.0.0.1:{server.client_port}"

        async def roundtrip():
            client = await connect(server.endpoint)
            await client.put(b"/k", b"v")
            value = (await client.get(b"/k")).value
            await client.close()
            return value

        assert run(roundtrip()) == b"v"
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: no zombie, no orphan


def test_embedded_etcd_reports_a_failed_start(tmp_path):
    with EmbeddedEtcd(tmp_path / "a") as first:
        clash = EmbeddedEtcd(tmp_path / "b", client_port=first.client_port)  # port taken
        with pytest.raises(RuntimeError, match="client port .* cannot be bound"):
            clash.start(timeout=10)
        assert not clash.running
    broken = EmbeddedEtcd(tmp_path / "c", binary="/bin/false")  # a server that dies at once
    with pytest.raises(RuntimeError, match="exited with code 1"):
        broken.start(timeout=10)
    assert not broken.running


def test_parse_endpoints():
    assert parse_endpoints("a:1, http://b:2/,[::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    assert parse_endpoints(["h:2379"]) == [("h", 2379)]
    for bad in ("a", "a:x", "a:0", ":1", "", "https://a"):
        with pytest.raises(ValueError, match="endpoint"):
            parse_endpoints(bad)


def test_connect_skips_a_dead_endpoint_and_fails_clearly(etcd_server):
    dead = f"127.0.0.1:{free_port()}"

    async def main():
        client = await connect(f"{dead},{etcd_server.endpoint}", timeout_s=2)
        assert (await client.status()).version
        await client.close()
        with pytest.raises(ConnectionError, match=dead):
            await connect(dead, timeout_s=1)

    run(main())


# -- membership -----------------------------------------------------------------------------------

def test_register_is_seen_within_a_second_and_deregister_at_once(etcd_server):
    async def main():
        client = await connect(etcd_server.endpoint)
        log = Log()
        watcher = await watcher_for(client, log).start()
        stream = watcher.events()
        assert watcher.members == {}

        reg = WorkerRegistration(client, DEPLOY, info("w1", "decode"), "10.0.0.1:50051", ttl_s=TTL,
                                 meta={"kv_transfer": "10.0.0.1:7000"})
        t0 = time.monotonic()
        await reg.start()
        await watcher.wait_for(lambda m: "w1" in m, timeout=1.0)
        assert time.monotonic() - t0 < 1.0
        got = watcher.members["w1"]
        assert got == reg.record and got.endpoint == "10.0.0.1:50051" and got.role == "decode"
        assert got.meta == {"kv_transfer": "10.0.0.1:7000"}
        assert await list_workers(client, DEPLOY) == [reg.record]
        first = await stream.__anext__()
        assert (first.kind, first.worker_id, first.record) == ("add", "w1", reg.record)

        t0 = time.monotonic()
        assert await reg.deregister() is True
        await watcher.wait_for(lambda m: "w1" not in m, timeout=0.5)  # revoke, not TTL
        assert time.monotonic() - t0 < 0.5
        assert (await stream.__anext__()).kind == "remove"
        assert await list_workers(client, DEPLOY) == []
        assert await client.get(worker_key(DEPLOY, "w1").encode()) is None
        assert await reg.deregister() is True  # idempotent
        assert log.of("w1") == ["add", "remove"]
        await watcher.stop()
        with pytest.raises(StopAsyncIteration):  # stopping the watcher ends its streams
            await stream.__anext__()
        await client.close()

    run(main())


def test_a_dead_worker_drops_out_within_its_ttl(etcd_server):
    async def main():
        client = await connect(etcd_server.endpoint)
        log = Log()
        dead = await WorkerRegistration(client, DEPLOY, info("dead"), "h:1", ttl_s=TTL).start()
        live = await WorkerRegistration(client, DEPLOY, info("live"), "h:2", ttl_s=TTL).start()
        watcher = await watcher_for(client, log).start()  # the snapshot holds both
        assert log.of("dead") == ["add"] and log.of("live") == ["add"]

        t0 = time.monotonic()
        await dead.abandon()  # the process died: no more keep-alives, no revoke
        await watcher.wait_for(lambda m: "dead" not in m, timeout=TTL + 1.5)
        assert time.monotonic() - t0 <= TTL + 1.0
        await asyncio.sleep(TTL)  # well past a TTL since start: only the keep-alive holds "live"
        assert set(watcher.members) == {"live"} and live.alive and live.registrations == 1
        assert log.of("dead") == ["add", "remove"] and log.of("live") == ["add"]
        assert await dead.deregister() is True  # the lease is gone already: nothing left to drain
        await live.deregister()
        await watcher.stop()
        await client.close()

    run(main())


def test_a_lost_lease_is_replaced_by_a_new_one(etcd_server):
    """The lease expired behind the worker's back (a partition longer than the TTL): it re-registers."""
    async def main():
        client = await connect(etcd_server.endpoint)
        other = await connect(etcd_server.endpoint)
        log = Log()
        reg = await WorkerRegistration(client, DEPLOY, info("w"), "h:1", ttl_s=TTL).start()
        watcher = await watcher_for(other, log).start()
        old_lease = reg.lease_id
        await other.revoke_lease(old_lease)
        await watcher.wait_for(lambda m: "w" not in m, timeout=1.0)
        await watcher.wait_for(lambda m: "w" in m, timeout=TTL)  # within one refresh interval
        await until(lambda: reg.registrations == 2, timeout=1.0)
        assert reg.lease_id != old_lease
        assert (await client.get(worker_key(DEPLOY, "w").encode())).lease == reg.lease_id
        assert log.of("w") == ["add", "remove", "add"]
        await reg.deregister()
        await watcher.stop()
        await asyncio.gather(client.close(), other.close())

    run(main())


def test_etcd_restart_keeps_membership_then_reconciles(etcd_server):
    """etcd goes away for longer than a TTL and comes back on the same data dir and ports."""
    async def main():
        client = await connect(etcd_server.endpoint)
        log = Log()
        live = await WorkerRegistration(client, DEPLOY, info("live"), "h:1", ttl_s=TTL).start()
        dying = await WorkerRegistration(client, DEPLOY, info("dying"), "h:2", ttl_s=TTL).start()
        watcher = await watcher_for(client, log).start()
        await dying.abandon()  # dies just before the outage: its lease outlives the restart, then expires

        etcd_server.stop()
        await asyncio.sleep(0.3)
        assert not watcher.connected
        await asyncio.sleep(TTL + 0.5)  # longer than a TTL, yet nothing is dropped while away
        assert set(watcher.members) == {"live", "dying"} and live.alive

        etcd_server.start()
        await watcher.wait_for(lambda m: "dying" not in m, timeout=TTL + 5)
        assert watcher.connected and watcher.resyncs >= 1
        assert set(watcher.members) == {"live"}
        assert await list_workers(client, DEPLOY) == [live.record]
        await asyncio.sleep(TTL)  # the keep-alive resumed on the restarted member
        assert set(w.worker_id for w in await list_workers(client, DEPLOY)) == {"live"}
        assert log.of("live") in (["add"], ["add", "remove", "add"]) and log.of("dying") == ["add", "remove"]
        await live.deregister()
        await watcher.wait_for(lambda m: not m, timeout=1.0)  # the new watch stream works
        await watcher.stop()
        await client.close()

    run(main())


def test_etcd_losing_its_data_is_reconciled(etcd_server, tmp_path):
    """etcd comes back empty (new data dir, same ports): the watcher relists and emits what changed,
    the live registration re-registers under a new lease."""
    async def main(fresh: EmbeddedEtcd):
        client = await connect(etcd_server.endpoint)
        log = Log()
        live = await WorkerRegistration(client, DEPLOY, info("live"), "h:1", ttl_s=TTL).start()
        gone = await WorkerRegistration(client, DEPLOY, info("gone"), "h:2", ttl_s=TTL).start()
        watcher = await watcher_for(client, log).start()
        await gone.abandon()

        etcd_server.stop()
        await asyncio.sleep(0.3)
        assert not watcher.connected and set(watcher.members) == {"live", "gone"}
        fresh.start()
        await watcher.wait_for(lambda m: set(m) == {"live"}, timeout=TTL + 5)
        await until(lambda: live.registrations == 2, timeout=1.0)
        assert watcher.connected
        assert await list_workers(client, DEPLOY) == [live.record]
        assert log.of("gone") == ["add", "remove"]
        assert log.of("live") in (["add"], ["add", "remove", "add"])
        await live.deregister()
        await watcher.wait_for(lambda m: not m, timeout=1.0)
        await watcher.stop()
        await client.close()

    fresh = EmbeddedEtcd(tmp_path / "etcd-fresh", client_port=etcd_server.client_port,
                         peer_port=etcd_server.peer_port, unsafe_no_fsync=True)
    try:
        run(main(fresh))
    finally:
        fresh.stop()


def test_a_watcher_started_while_etcd_is_down_raises(tmp_path):
    async def main():
        client = aetcd.Client("127.0.0.1", free_port(), timeout=1)
        with pytest.raises(aetcd.ClientError):
            await MembershipWatcher(client, DEPLOY).start()
        with pytest.raises(aetcd.ClientError):
            await WorkerRegistration(client, DEPLOY, info("w"), "h:1").start()
        await client.close()

    run(main())


def test_malformed_and_foreign_keys_are_ignored(etcd_server):
    async def main():
        client = await connect(etcd_server.endpoint)
        watcher = await MembershipWatcher(client, DEPLOY).start()
        await client.put(worker_key(DEPLOY, "junk").encode(), b"{not json")
        await client.put(worker_key(DEPLOY, "liar").encode(), WorkerRecord(info("other"), "h:1").to_json())
        await client.put(f"/shoal/{DEPLOY}x/workers/w".encode(), WorkerRecord(info("w"), "h:1").to_json())
        reg = await WorkerRegistration(client, DEPLOY, info("ok"), "h:2", ttl_s=TTL).start()
        await watcher.wait_for(lambda m: "ok" in m, timeout=1.0)
        assert set(watcher.members) == {"ok"}
        assert [r.worker_id for r in await list_workers(client, DEPLOY)] == ["ok"]
        await reg.deregister()
        await watcher.stop()
        await client.close()

    run(main())


def test_callbacks_run_in_order_before_waiters_wake_and_a_failing_one_is_contained(etcd_server):
    async def main():
        client = await connect(etcd_server.endpoint)
        seen: list[str] = []

        async def on_add(record: WorkerRecord) -> None:
            await asyncio.sleep(0.05)  # a router connecting to the worker
            seen.append(record.worker_id)
            if record.worker_id == "bad":
                raise RuntimeError("cannot connect")

        watcher = await MembershipWatcher(client, DEPLOY, on_add=on_add).start()
        regs = [await WorkerRegistration(client, DEPLOY, info(w), "h:1", ttl_s=TTL).start()
                for w in ("bad", "good")]
        await watcher.wait_for(lambda m: "good" in m, timeout=1.0)
        assert seen == ["bad", "good"]  # both callbacks done when wait_for returned
        assert watcher.connected and set(watcher.members) == {"bad", "good"}
        for reg in regs:
            await reg.deregister()
        await watcher.wait_for(lambda m: not m, timeout=1.0)
        await watcher.stop()
        await client.close()

    run(main())


# -- spec and listings ----------------------------------------------------------------------------

def test_spec_round_trip_and_list_deployments(etcd_server):
    spec = load_spec(EXAMPLE)
    other = DeploymentSpec.from_dict(spec.to_dict() | {"name": "other", "etcd": {"prefix": "/elsewhere"}})

    async def main():
        client = await connect(etcd_server.endpoint)
        assert await list_deployments(client) == []
        assert await get_spec(client, spec.name) is None
        assert await put_spec(client, spec) > 0
        assert await put_spec(client, other) > 0
        assert await get_spec(client, spec.name) == spec
        assert await get_spec(client, "other", prefix="/elsewhere") == other
        assert await get_spec(client, "other") is None  # another prefix
        reg = await WorkerRegistration(client, "workers-only", info("w"), "h:1", ttl_s=TTL).start()
        assert await list_deployments(client) == sorted([spec.name, "workers-only"])
        assert await list_deployments(client, prefix="/elsewhere") == ["other"]
        assert await delete_deployment(client, spec.name) == 1
        assert await list_deployments(client) == ["workers-only"]
        await reg.deregister()
        assert await list_deployments(client) == []
        await client.close()

    run(main())


def test_worker_record_json_round_trip_and_key_checks():
    record = WorkerRecord(info("w1", "prefill"), "10.0.0.2:50051", {"node": "n1"})
    assert WorkerRecord.from_json(record.to_json()) == record
    newer = record.to_json().replace(b'"endpoint"', b'"future_field": 1, "endpoint"')
    assert WorkerRecord.from_json(newer) == record  # unknown keys from a newer worker are ignored
    for bad in ("", "a/b"):
        with pytest.raises(ValueError, match="worker_id"):
            worker_key(DEPLOY, bad)
    with pytest.raises(ValueError, match="ttl_s"):
        WorkerRegistration(None, DEPLOY, info("w"), "h:1", ttl_s=0)
