"""The etcd control plane: worker membership under leases, and the deployment spec (aetcd, asyncio).

Key layout (``prefix`` is the spec's ``etcd.prefix``, ``/shoal`` by default)::

    <prefix>/<deployment>/spec                  the DeploymentSpec as JSON
    <prefix>/<deployment>/workers/<worker_id>   a WorkerRecord as JSON, attached to the worker's lease
    <prefix>/<deployment>/routers/<router_id>   a RouterRecord as JSON, attached to the router's lease

A worker is a member exactly while its key exists: :class:`WorkerRegistration` keeps the lease alive
(and puts a fresh one if etcd forgot it), so a dead worker drops out within its TTL and a drained one
(:meth:`WorkerRegistration.deregister`) at once. :class:`MembershipWatcher` turns the keys into
add / remove events with no gap: a snapshot at revision R, then a watch from R + 1; after losing
etcd it keeps the last membership it knew, and on reconnecting lists again and emits the difference.
Routers register the same way (:class:`RouterRegistration`), so ``shoal status`` can list them and a
load balancer's configuration can be read from etcd; nothing routes by router keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import aetcd

from shoal.cluster.etcd import endpoint_list, parse_endpoints
from shoal.cluster.etcd_tls import EtcdTls, SecureClient, endpoints_use_tls
from shoal.cluster.spec import DeploymentSpec
from shoal.workers.protocol import WorkerInfo

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/shoal"

# gRPC channel options: notice an unresponsive etcd (a partition, a frozen host) on an open watch
# within ~15 s — a ping every 10 s (etcd refuses pings more often than every 5 s), broken when its ack
# is 5 s late (gRPC 1.85 needs ping_timeout_ms for that; keepalive_timeout_ms alone did not) — and
# reconnect within a second of etcd coming back.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,  # keep pinging a quiet watch stream
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1_000,
}


# -- keys -----------------------------------------------------------------------------------------

def _check_segment(kind: str, value: str) -> None:
    if not isinstance(value, str) or not value or "/" in value or not value.isprintable():
        raise ValueError(f"{kind} must be a non-empty printable string without '/', got {value!r}")


def _norm_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"etcd prefix must start with '/' and not end with one, got {prefix!r}")
    return prefix


def _members_prefix(deployment: str, kind: str, prefix: str) -> str:
    """``<prefix>/<deployment>/<kind>/``: ends in '/', so deployment ``a`` never matches ``ab``'s."""
    _check_segment("deployment", deployment)
    return f"{_norm_prefix(prefix)}/{deployment}/{kind}/"


def workers_prefix(deployment: str, prefix: str = DEFAULT_PREFIX) -> str:
    return _members_prefix(deployment, "workers", prefix)


def worker_key(deployment: str, worker_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    _check_segment("worker_id", worker_id)
    return workers_prefix(deployment, prefix) + worker_id


def routers_prefix(deployment: str, prefix: str = DEFAULT_PREFIX) -> str:
    return _members_prefix(deployment, "routers", prefix)


def router_key(deployment: str, router_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    _check_segment("router_id", router_id)
    return routers_prefix(deployment, prefix) + router_id


def autoscale_prefix(deployment: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/<deployment>/autoscale/``: each pool's latest decision (``cluster/autoscale/record.py``)."""
    return _members_prefix(deployment, "autoscale", prefix)


def autoscale_key(deployment: str, pool: str, prefix: str = DEFAULT_PREFIX) -> str:
    _check_segment("pool", pool)
    return autoscale_prefix(deployment, prefix) + pool


def demand_prefix(deployment: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/<deployment>/demand/``: a router holding requests for a worker (scale to zero) keeps a
    leased key here; the autoscaler counts the keys as waiting work."""
    return _members_prefix(deployment, "demand", prefix)


def demand_key(deployment: str, router_key: str, prefix: str = DEFAULT_PREFIX) -> str:
    _check_segment("router key", router_key)
    return demand_prefix(deployment, prefix) + router_key


def demand_value(held: int) -> bytes:
    return json.dumps({"held": held}).encode()


def held_requests(value: bytes) -> int:
    """The requests a demand key stands for: its ``held`` count (``true``, or unreadable: one)."""
    try:
        held = json.loads(value).get("held")
    except (ValueError, AttributeError):
        return 1
    return held if isinstance(held, int) and not isinstance(held, bool) and held > 0 else 1


def spec_key(deployment: str, prefix: str = DEFAULT_PREFIX) -> str:
    _check_segment("deployment", deployment)
    return f"{_norm_prefix(prefix)}/{deployment}/spec"


# -- the record of one worker ---------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerRecord:
    """What etcd holds for one worker: its ``WorkerInfo``, where its gRPC service listens, and extras
    (e.g. a KV-transfer address). Stored flat: the WorkerInfo fields, ``endpoint`` and ``meta``."""

    info: WorkerInfo
    endpoint: str  # host:port of the worker's gRPC service (rank 0)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    def to_json(self) -> bytes:
        body = dataclasses.asdict(self.info) | {"endpoint": self.endpoint, "meta": dict(self.meta)}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "WorkerRecord":
        """Unknown keys are ignored (a newer worker may write more); missing required ones raise."""
        body = json.loads(data)
        names = {f.name for f in dataclasses.fields(WorkerInfo)}
        info = WorkerInfo(**{k: v for k, v in body.items() if k in names})
        return cls(info=info, endpoint=body["endpoint"], meta=body.get("meta") or {})


@dataclass(frozen=True)
class RouterRecord:
    """What etcd holds for one OpenAI router replica: its id, its base URL (the API is under
    ``<url>/v1``) and extras (``node_id``, ``pid``)."""

    router_id: str
    url: str  # http://host:port
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"router_id": self.router_id, "url": self.url, "meta": dict(self.meta)},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "RouterRecord":
        body = json.loads(data)
        return cls(router_id=body["router_id"], url=body["url"], meta=body.get("meta") or {})


@dataclass(frozen=True)
class MembershipEvent:
    kind: str  # "add" | "remove"
    worker_id: str
    record: WorkerRecord | None = None  # the added worker; None for a remove


# -- client ---------------------------------------------------------------------------------------

async def connect(endpoints: str | list[str] | tuple[str, ...], *, timeout_s: float = 5.0) -> aetcd.Client:
    """A connected client for ``"host:port[,host:port]"``: the first endpoint whose etcd answers.

    One client talks to one member (its channel reconnects to that member by itself). For
    failover across members, give the address of a load balancer or Kubernetes Service.
    ``timeout_s`` bounds every unary call the client makes. ``https://`` endpoints connect with TLS,
    the certificates named by ``SHOAL_ETCD_CACERT`` / ``SHOAL_ETCD_CERT`` / ``SHOAL_ETCD_KEY``
    (:mod:`shoal.cluster.etcd_tls`).
    """
    errors = []
    parsed = parse_endpoints(endpoints)
    credentials = EtcdTls.from_env().credentials() if endpoints_use_tls(endpoint_list(endpoints)) else None
    for host, port in parsed:
        if credentials is None:
            client = aetcd.Client(host, port, timeout=timeout_s, options=dict(_CHANNEL_OPTIONS))
        else:
            client = SecureClient(host, port, credentials=credentials, timeout=timeout_s,
                                  options=dict(_CHANNEL_OPTIONS))
        try:
            await asyncio.wait_for(client.status(), timeout_s)
            return client
        except Exception as e:  # noqa: BLE001 - any failure means "try the next endpoint"
            errors.append(f"{host}:{port}: {type(e).__name__}: {e}")
            await client.close()
    raise ConnectionError("no etcd endpoint answered: " + "; ".join(errors))


# -- spec and listings ----------------------------------------------------------------------------

async def put_spec(client: aetcd.Client, spec: DeploymentSpec) -> int:
    """Store the spec under ``<spec.etcd.prefix>/<spec.name>/spec``; returns the etcd revision."""
    put = await client.put(spec_key(spec.name, spec.etcd.prefix).encode(), spec.to_json().encode())
    return put.header.revision


async def get_spec(client: aetcd.Client, deployment: str, prefix: str = DEFAULT_PREFIX) -> DeploymentSpec | None:
    got = await client.get(spec_key(deployment, prefix).encode())
    return DeploymentSpec.from_json(got.value) if got is not None else None


async def list_deployments(client: aetcd.Client, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Deployments with any key (spec, worker, router, control) under ``prefix``, sorted."""
    root = _norm_prefix(prefix) + "/"
    found = await client.get_prefix(root.encode(), keys_only=True)
    names = {kv.key.decode()[len(root):].split("/", 1)[0] for kv in found}
    return sorted(n for n in names if n)


async def list_workers(client: aetcd.Client, deployment: str, prefix: str = DEFAULT_PREFIX) -> list[WorkerRecord]:
    """The registered workers, sorted by id (records that do not parse are skipped with a warning)."""
    members, _ = await _snapshot(client, workers_prefix(deployment, prefix))
    return [members[w] for w in sorted(members)]


async def list_routers(client: aetcd.Client, deployment: str, prefix: str = DEFAULT_PREFIX) -> list[RouterRecord]:
    """The registered routers, sorted by id (records that do not parse are skipped with a warning)."""
    root = routers_prefix(deployment, prefix)
    routers = []
    for kv in await client.get_prefix(root.encode()):
        try:
            record = RouterRecord.from_json(kv.value)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring malformed router record %s: %s", kv.key.decode(), e)
            continue
        if record.router_id != kv.key.decode()[len(root):]:
            log.warning("ignoring router record %s: it names router %r", kv.key.decode(), record.router_id)
            continue
        routers.append(record)
    return sorted(routers, key=lambda r: r.router_id)


async def delete_deployment(client: aetcd.Client, deployment: str, prefix: str = DEFAULT_PREFIX) -> int:
    """Delete every key under ``<prefix>/<deployment>/``: the spec, the control key, every worker and
    router key (their leases stay until they expire or are revoked)."""
    root = f"{_norm_prefix(prefix)}/{deployment}/"
    _check_segment("deployment", deployment)
    return (await client.delete_prefix(root.encode())).deleted


def _parse(key: bytes, value: bytes, root: str) -> WorkerRecord | None:
    worker_id = key.decode()[len(root):]
    try:
        record = WorkerRecord.from_json(value)
    except (ValueError, TypeError, KeyError) as e:
        log.warning("ignoring malformed worker record %s: %s", key.decode(), e)
        return None
    if record.worker_id != worker_id:
        log.warning("ignoring worker record %s: it names worker %r", key.decode(), record.worker_id)
        return None
    return record


async def _snapshot(client: aetcd.Client, root: str) -> tuple[dict[str, WorkerRecord], int]:
    """(worker id -> record, the revision the listing was read at)."""
    got = await client.get_prefix(root.encode())
    members = {}
    for kv in got:
        record = _parse(kv.key, kv.value, root)
        if record is not None:
            members[record.worker_id] = record
    return members, got.header.revision


# -- registrations: a key that lives as long as its owner ------------------------------------------

class LeasedKey:
    """Keep ``key`` = ``value`` in etcd under a lease of ``ttl_s`` seconds while this object is alive.

    The lease is refreshed every third of its TTL. If etcd says the lease is gone (it expired
    while etcd was unreachable, or etcd lost its data) a new lease is granted and the key put
    again; after any outage the key is put again on the same lease, in case etcd came back from
    an older snapshot. Keys must be unique among live processes: the last writer owns the key.
    """

    def __init__(self, client: aetcd.Client, key: str, value: bytes, ttl_s: int = 10, *,
                 retry_s: float = 0.1, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be an integer >= 1 (etcd leases count whole seconds), got {ttl_s!r}")
        if retry_s <= 0:
            raise ValueError(f"retry_s must be > 0, got {retry_s}")
        self.client = client
        self.key = key
        self.value = value
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._sleep = sleep
        self.lease_id: int | None = None
        self.granted_ttl_s: int = ttl_s  # etcd may raise a TTL to its minimum
        self.registrations = 0  # leases this registration has put its key under
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """The keep-alive task is running."""
        return self._task is not None and not self._task.done()

    async def start(self) -> "LeasedKey":
        """Register now (raises if etcd cannot be reached), then keep the lease alive in the background."""
        if self._task is not None:
            raise RuntimeError(f"registration of {self.key!r} was already started")
        await self._register()
        self._task = asyncio.get_running_loop().create_task(self._keepalive(), name=f"etcd-lease:{self.key}")
        return self

    async def update(self, value: bytes) -> None:
        """Put a new value under the current lease (and under any later one the keep-alive grants)."""
        self.value = value
        if self.lease_id is not None:
            await self.client.put(self.key.encode(), value, lease=self.lease_id)

    async def deregister(self, timeout_s: float = 5.0) -> bool:
        """Drain: stop the keep-alive and revoke the lease, which deletes the key at once.

        Returns False when etcd could not be told (the key then expires with its TTL). Idempotent.
        """
        await self.abandon()
        if self.lease_id is None:
            return True
        lease_id, self.lease_id = self.lease_id, None
        try:
            async with asyncio.timeout(timeout_s):
                await self.client.revoke_lease(lease_id)
            return True
        except Exception as e:  # noqa: BLE001 - unreachable etcd: the TTL finishes the job
            if "lease not found" in str(e):  # it expired already and took the key with it
                return True
            log.warning("could not revoke lease of %s (%s); it expires within %d s", self.key, e, self.granted_ttl_s)
            return False

    async def abandon(self) -> None:
        """Stop refreshing without revoking, as a crashed process would: the key lives out its TTL."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> "LeasedKey":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.deregister()

    async def _register(self) -> None:
        lease = await self.client.lease(self.ttl_s)
        # Ours from now on: should the put fail, the keep-alive refreshes this lease and, the outage
        # over, puts the key again under it.
        self.lease_id, self.granted_ttl_s = lease.id, lease.ttl
        await self.client.put(self.key.encode(), self.value, lease=lease.id)
        self.registrations += 1

    async def _keepalive(self) -> None:
        interval = max(self.granted_ttl_s / 3, 0.1)
        delay, outage = interval, False
        while True:
            await self._sleep(delay)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that races the reply,
                # and then abandon()/deregister() wait on this loop forever (seen in a full CI run).
                async with asyncio.timeout(interval):
                    reply = await self.client.refresh_lease(self.lease_id)
                if reply is None or reply.TTL <= 0:
                    log.warning("lease of %s is gone; registering again", self.key)
                    await self._register()
                elif outage:  # etcd may be back from an older snapshot that lacks the key
                    await self.client.put(self.key.encode(), self.value, lease=self.lease_id)
                interval = max(self.granted_ttl_s / 3, 0.1)
                delay, outage = interval, False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd unreachable: retry until the lease is known dead
                if not outage:
                    log.warning("keeping %s alive failed (%s: %s); retrying", self.key, type(e).__name__, e)
                # Retry soon (the lease is running out), backing off from retry_s to the refresh interval.
                delay = min(delay * 2, interval) if outage else min(self.retry_s, interval)
                outage = True


class WorkerRegistration(LeasedKey):
    """A worker is a member while this keeps its ``WorkerRecord`` under ``workers/<worker_id>``."""

    def __init__(self, client: aetcd.Client, deployment: str, info: WorkerInfo, endpoint: str,
                 ttl_s: int = 10, *, prefix: str = DEFAULT_PREFIX, meta: Mapping[str, Any] | None = None,
                 retry_s: float = 0.1, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.deployment = deployment
        self.record = WorkerRecord(info, endpoint, dict(meta or {}))
        super().__init__(client, worker_key(deployment, info.worker_id, prefix), self.record.to_json(), ttl_s,
                         retry_s=retry_s, sleep=sleep)

    @property
    def worker_id(self) -> str:
        return self.record.worker_id


class RouterRegistration(LeasedKey):
    """A router is listed while this keeps its ``RouterRecord`` under ``routers/<router_id>``."""

    def __init__(self, client: aetcd.Client, deployment: str, router_id: str, url: str, ttl_s: int = 10, *,
                 prefix: str = DEFAULT_PREFIX, meta: Mapping[str, Any] | None = None, retry_s: float = 0.1,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.deployment = deployment
        self.record = RouterRecord(router_id, url, dict(meta or {}))
        super().__init__(client, router_key(deployment, router_id, prefix), self.record.to_json(), ttl_s,
                         retry_s=retry_s, sleep=sleep)

    @property
    def router_id(self) -> str:
        return self.record.router_id


# -- membership -----------------------------------------------------------------------------------

Callback = Callable[..., Any]  # sync or async; awaited when it returns an awaitable


class MembershipWatcher:
    """The live set of a deployment's workers, as a dict, callbacks and an event stream.

    ``on_add(record)`` / ``on_remove(worker_id)`` run on the watcher's task, one at a time in event
    order, each before ``members``, ``events()`` and ``wait_for`` see its change; an exception in one
    is logged and does not stop the watcher. A record that changes under the same id (a worker
    restarted on a new endpoint) is reported as a remove, then an add.
    """

    def __init__(self, client: aetcd.Client, deployment: str, *, prefix: str = DEFAULT_PREFIX,
                 on_add: Callback | None = None, on_remove: Callback | None = None,
                 retry_s: float = 0.1, retry_max_s: float = 5.0, op_timeout_s: float = 5.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not 0 < retry_s <= retry_max_s:
            raise ValueError(f"retry_s must be in (0, retry_max_s={retry_max_s}], got {retry_s}")
        self.client = client
        self.deployment = deployment
        self.root = workers_prefix(deployment, prefix)
        self.on_add, self.on_remove = on_add, on_remove
        self.retry_s, self.retry_max_s, self.op_timeout_s = retry_s, retry_max_s, op_timeout_s
        self._sleep = sleep
        self._members: dict[str, WorkerRecord] = {}
        self.revision = 0  # the etcd revision the membership reflects
        self.connected = False
        self.resyncs = 0  # listings after the first: one per reconnect
        self._queues: list[asyncio.Queue] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    @property
    def members(self) -> dict[str, WorkerRecord]:
        """A copy of the last known membership (kept while etcd is unreachable)."""
        return dict(self._members)

    async def start(self) -> "MembershipWatcher":
        """List the members (on_add for each; raises if etcd cannot be reached), then watch."""
        if self._task is not None:
            raise RuntimeError("the watcher was already started")
        await self._resync()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"etcd-watch:{self.root}")
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.connected = False
        for queue in self._queues:
            queue.put_nowait(None)

    async def __aenter__(self) -> "MembershipWatcher":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def events(self) -> AsyncIterator[MembershipEvent]:
        """An event stream that starts with an ``add`` per current member, then every change."""
        queue: asyncio.Queue = asyncio.Queue()
        for record in self._members.values():
            queue.put_nowait(MembershipEvent("add", record.worker_id, record))
        self._queues.append(queue)
        return self._drain(queue)

    async def wait_for(self, predicate: Callable[[dict[str, WorkerRecord]], bool], timeout: float) -> None:
        """Return once ``predicate(members)`` holds; TimeoutError after ``timeout`` seconds."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.members)), timeout)

    # -- internals ------------------------------------------------------------------------------

    async def _drain(self, queue: asyncio.Queue) -> AsyncIterator[MembershipEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if queue in self._queues:
                self._queues.remove(queue)

    async def _run(self) -> None:
        delay = self.retry_s
        while True:
            try:
                if not self.connected:
                    await self._resync()
                    self.resyncs += 1
                    delay = self.retry_s
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd unreachable or the watch broke: relist later
                if self.connected:
                    log.warning("lost etcd watch on %s (%s: %s); keeping %d known workers",
                                self.root, type(e).__name__, e, len(self._members))
                self.connected = False
                await self._sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def _watch(self) -> None:
        """Apply events from revision + 1 until the stream breaks (then raise)."""
        watch = await asyncio.wait_for(
            self.client.watch_prefix(self.root.encode(), start_revision=self.revision + 1), self.op_timeout_s)
        try:
            async for event in watch:
                await self._apply(event)
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except Exception:  # noqa: BLE001 - the stream is already gone
                pass
        raise ConnectionError("etcd watch stream ended")

    async def _resync(self) -> None:
        """List, then emit the difference from what we knew: what came and went while we were away.

        Only the listing is timed: callbacks (a router connecting to a new worker) may take longer.
        """
        members, revision = await asyncio.wait_for(_snapshot(self.client, self.root), self.op_timeout_s)
        for worker_id in [w for w in self._members if w not in members or members[w] != self._members[w]]:
            await self._remove(worker_id)
        for worker_id, record in members.items():
            if worker_id not in self._members:
                await self._add(record)
        self.revision, self.connected = revision, True

    async def _apply(self, event: aetcd.Event) -> None:
        worker_id = event.kv.key.decode()[len(self.root):]
        record = _parse(event.kv.key, event.kv.value, self.root) if event.kind == "PUT" else None
        known = self._members.get(worker_id)
        if known is not None and known != record:
            await self._remove(worker_id)
        if record is not None and known != record:
            await self._add(record)
        self.revision = max(self.revision, event.kv.mod_revision)

    # Members change after their callback returns: whoever wakes from wait_for or reads an event
    # finds the callback's work done (a router's pool already holds the worker).

    async def _add(self, record: WorkerRecord) -> None:
        await self._call(self.on_add, record, "add", record.worker_id)
        self._members[record.worker_id] = record
        await self._publish(MembershipEvent("add", record.worker_id, record))

    async def _remove(self, worker_id: str) -> None:
        await self._call(self.on_remove, worker_id, "remove", worker_id)
        del self._members[worker_id]
        await self._publish(MembershipEvent("remove", worker_id))

    @staticmethod
    async def _call(callback: Callback | None, arg: Any, kind: str, worker_id: str) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - one bad callback must not stop membership tracking
            log.exception("membership callback for %s %s failed", kind, worker_id)

    async def _publish(self, event: MembershipEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)
        async with self._changed:
            self._changed.notify_all()
