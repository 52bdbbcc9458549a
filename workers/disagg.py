"""Disaggregated serving inside a worker: the prefill side's pinned prompts and links, the decode
side's pulls.

One request, end to end (the router drives the first two steps):

1. prefill worker, ``Prefill`` RPC: the prompt runs (one token is sampled and dropped); at the moment
   it finishes, still on the engine thread, its full blocks are pinned in the ``ExportTable``
   (``workers/kv_exports.py``) for ``ttl_s`` and a ``KVHandle`` goes back to the router;
2. decode worker, ``Generate`` with ``kv_source``: :class:`DecodeSide` reserves blocks for what its
   prefix cache lacks, takes a link to the prefill worker from its pool (opening one with
   ``OpenKVLink`` if needed), calls ``PullKV`` (the prefill worker gathers the blocks, unpins the
   prompt and starts sending), receives, and publishes the blocks in its prefix cache; the request
   is then added like any other and finds the prompt cached but for its last partial block.

Both sides reach their engine only through ``EngineAccess`` (``workers/engine_access.py``): block
pool work runs on the engine thread. Control travels over gRPC, data over the link (torch.distributed
point-to-point). Anything that
fails undoes itself on its own side: the decode worker aborts its reservation and computes the
prefill itself; the prefill worker's pin expires after ``ttl_s`` if nobody pulls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import grpc
import torch

from .aio import in_thread
from .disagg_config import DisaggConfig  # noqa: F401  (re-exported: the workers' import path)
from .engine_access import EngineAccess
from .executor.kv_transfer import (CacheBlockIO, ExportedPrefix, KVGeometry, KVLink, KVSink, KVTransferError,
                                   LinkStore, backend_for, pipeline)
from .protocol import GenerateRequest
from .rpc import worker_pb2 as pb
from .rpc import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def geometry_to_pb(g: KVGeometry) -> pb.KVGeometry:
    return pb.KVGeometry(num_layers=g.num_layers, block_size=g.block_size, num_kv_heads=g.num_kv_heads,
                         head_dim=g.head_dim, dtype=_DTYPE_NAMES[g.dtype])


def geometry_from_pb(msg: pb.KVGeometry) -> KVGeometry:
    if msg.dtype not in _DTYPES:
        raise ValueError(f"KV geometry dtype must be one of {sorted(_DTYPES)}, got {msg.dtype!r}")
    return KVGeometry(msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, _DTYPES[msg.dtype])


# -- prefill side ------------------------------------------------------------------------------------

class PrefillLinks:
    """The links decode workers opened to this worker, met through one ``LinkStore`` it hosts."""

    def __init__(self, host: str, device: torch.device, config: DisaggConfig):
        self.config, self.device = config, device
        self._store = LinkStore(host, 0, timedelta(seconds=config.link_timeout_s))
        self.host, self.port = host, self._store.port
        self._links: dict[str, KVLink] = {}
        self._sending: dict[str, int] = {}  # link id -> sends in progress (such a link is never retired)
        self._ready: dict[str, threading.Event] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def open(self, link_id: str) -> None:
        """Join link ``link_id`` as rank 0 in the background (the peer joins as rank 1 meanwhile)."""
        with self._lock:
            if link_id in self._ready:
                raise ValueError(f"link {link_id!r} is already open")
            self._ready[link_id] = threading.Event()
        self._retire_extra()
        threading.Thread(target=self._join, args=(link_id,), name=f"shoal-kv-link-{link_id[:8]}",
                         daemon=True).start()

    def _join(self, link_id: str) -> None:
        try:
            # A store client of its own: joins on several threads must not share the server's object.
            link = KVLink.connect(link_id, 0, self.host, self.port, device=self.device,
                                  timeout=timedelta(seconds=self.config.link_timeout_s))
            with self._lock:
                self._links[link_id] = link
        except Exception as e:
            log.warning("KV link %s could not be joined: %s", link_id, e)
            with self._lock:
                self._errors[link_id] = str(e)
        finally:
            ready = self._ready.get(link_id)  # closed meanwhile: nobody waits for it any more
            if ready is not None:
                ready.set()

    def get(self, link_id: str) -> KVLink:
        """The joined link (waits for a join still in progress, at most the link timeout)."""
        ready = self._ready.get(link_id)
        if ready is None:
            raise KeyError(f"no KV link {link_id!r} is open here")
        ready.wait(self.config.link_timeout_s)
        with self._lock:
            link = self._links.get(link_id)
            if link is None:
                raise KVTransferError(f"KV link {link_id} is not usable: "
                                      f"{self._errors.get(link_id, 'still joining')}")
        if link.broken is not None:
            self.close(link_id)
            raise KVTransferError(f"KV link {link_id} broke earlier ({link.broken})")
        return link

    @contextlib.contextmanager
    def sending(self, link: KVLink):
        """Mark ``link`` busy for the duration of a send: retiring idle links passes it by."""
        with self._lock:
            self._sending[link.link_id] = self._sending.get(link.link_id, 0) + 1
        try:
            yield link
        finally:
            with self._lock:
                left = self._sending.pop(link.link_id, 1) - 1
                if left:
                    self._sending[link.link_id] = left

    def close(self, link_id: str) -> None:
        with self._lock:
            link = self._links.pop(link_id, None)
            self._ready.pop(link_id, None)
            self._errors.pop(link_id, None)
        if link is not None:
            link.close()

    def _retire_extra(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = sorted((link.last_used, lid) for lid, link in self._links.items() if lid not in self._sending)
        for n, (last_used, lid) in enumerate(idle):
            if now - last_used > self.config.link_idle_s or len(idle) - n >= self.config.max_links:
                self.close(lid)

    def close_all(self) -> None:
        for lid in list(self._ready):
            self.close(lid)
        self._store.close()

    def __len__(self) -> int:
        return len(self._links)


class PrefillSide:
    """What a worker does as a KV source: ``open_link``, ``pull`` (the ``OpenKVLink`` / ``PullKV`` RPCs)."""

    def __init__(self, engine: EngineAccess, host: str, config: DisaggConfig):
        self.engine, self.config = engine, config
        self.links = PrefillLinks(host, engine.kv_block_io.device, config)
        self.num_sent_blocks = 0

    def open_link(self, link_id: str, peer_geometry: pb.KVGeometry) -> pb.OpenKVLinkReply:
        """Raises ValueError if the peer's cache geometry is not this one's (or names no dtype we know)."""
        io = self.engine.kv_block_io
        io.geometry.check_same(geometry_from_pb(peer_geometry))
        self.links.open(link_id)
        return pb.OpenKVLinkReply(store_host=self.links.host, store_port=self.links.port,
                                  backend=backend_for(io.device))

    async def pull(self, request_id: str, link_id: str, indices: list[int], tag: int,
                   layers_per_chunk: int = 0) -> tuple[int, int]:
        """Start sending the asked-for blocks in the background; -> (blocks sent, layers per chunk).

        Pipelined (``layers_per_chunk`` > 0, this engine's cache in one process): the sender thread
        gathers chunk by chunk from the still-pinned blocks and unpins them when the last chunk left.
        Otherwise the engine thread gathers one whole tensor and unpins at once.
        """
        exports = self.engine.exports
        try:
            link = await in_thread(self.links.get, link_id) if indices else None
        except Exception:  # no usable link: the prompt stays unsent, so do not keep it pinned either
            await self.engine.call(lambda _: exports.release(request_id))
            raise
        io = self.engine.kv_block_io
        if not indices or not layers_per_chunk or not isinstance(io, CacheBlockIO):
            data = await self.engine.call(lambda _: exports.gather_and_release(request_id, indices))
            # (Cancelled meanwhile, the gather still ran and unpinned the prompt: nothing is left to undo.)
            if data is not None:
                self._start(self._send_whole, link, data, tag)
            return len(indices), 0
        exported = await self.engine.call(lambda _: exports.take(request_id), undo=exports.release_taken)
        block_ids = [exported.blocks[i].block_id for i in indices]
        self._start(self._send_chunks, link, io.kv_caches, block_ids, tag, layers_per_chunk, exported)
        return len(indices), layers_per_chunk

    def _start(self, target, *args) -> None:
        threading.Thread(target=target, args=args, daemon=True, name="shoal-kv-send").start()

    def _send_whole(self, link: KVLink, data: torch.Tensor, tag: int) -> None:
        try:
            with self.links.sending(link):
                link.send(data, tag)
            self.num_sent_blocks += data.shape[2]
        except KVTransferError as e:
            self._broken(link, e)

    def _send_chunks(self, link: KVLink, kv_caches, block_ids: list[int], tag: int, layers_per_chunk: int,
                     exported: ExportedPrefix) -> None:
        try:
            with self.links.sending(link):
                pipeline.send_blocks(link, kv_caches, block_ids, tag, layers_per_chunk)
            self.num_sent_blocks += len(block_ids)
        except KVTransferError as e:
            self._broken(link, e)
        finally:  # the blocks were read (or never will be): unpin, on the engine thread
            self.engine.call_soon(lambda _: self.engine.exports.release_taken(exported))

    def _broken(self, link: KVLink, error: Exception) -> None:
        log.warning("%s; closing the link", error)
        self.links.close(link.link_id)

    def close(self) -> None:
        self.links.close_all()


# -- decode side -------------------------------------------------------------------------------------

_WRITTEN = object()  # a pipelined receive wrote the blocks in place: nothing left to scatter


async def _finish_even_if_cancelled(awaitable) -> None:
    """Await a receive that writes into reserved cache blocks. Cancelled, still wait for it to end
    (it fails at the link's deadline at the latest) before re-raising: the caller gives the blocks
    back after, and they must not be written once another request may own them."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise

@dataclass(eq=False)
class _Peer:
    endpoint: str
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkerStub
    idle: list[KVLink]
    slots: asyncio.Semaphore | None = None


class DecodeSide:
    """What a worker does as a KV sink: pull a request's missing blocks from its prefill worker."""

    def __init__(self, engine: EngineAccess, config: DisaggConfig):
        self.engine, self.config = engine, config
        self._peers: dict[str, _Peer] = {}
        self._tags = itertools.count(1)
        self.num_pulled = self.num_failed = self.num_received_blocks = 0
        self.num_importing_blocks = 0  # reserved for pulls in flight
        self.num_pipelined = 0  # pulls received in chunks straight into the cache

    async def pull(self, req: GenerateRequest) -> int:
        """Import the prompt blocks this engine lacks from ``req.kv_source``; -> blocks received.

        Raises (having undone its reservation) when the transfer cannot complete; the caller then
        lets the engine compute the prefill itself.
        """
        handle = req.kv_source
        sink: KVSink = self.engine.kv_sink
        pending = await self.engine.call(lambda _: sink.begin(req.prompt_token_ids), undo=sink.abort)
        self.num_importing_blocks += len(pending.missing)
        pulled = False  # PullKV answered: the prefill worker unpinned the prompt itself
        try:
            peer = self._peer(handle.endpoint)
            if not pending.missing:  # all cached here already: only tell the prefill worker to unpin
                await self._pull_rpc(peer, handle.request_id, "", [], 0)
                await self.engine.call(lambda _: sink.commit(pending, None))
                self.num_pulled += 1
                return 0
            await asyncio.wait_for(peer.slots.acquire(), self.config.link_timeout_s)
            try:
                link = await self._take_link(peer)
                ok = False
                try:
                    tag = next(self._tags)
                    # Pipelined only into a cache this process holds whole (TP=1); a TP engine's
                    # ranks get their heads through the engine thread's scatter.
                    chunks = self.config.layers_per_chunk if isinstance(sink.io, CacheBlockIO) else 0
                    reply = await self._pull_rpc(peer, handle.request_id, link.link_id, pending.missing, tag,
                                                 chunks)
                    pulled = True
                    if reply.layers_per_chunk:
                        block_ids = [b.block_id for b in pending.new_blocks]
                        await _finish_even_if_cancelled(in_thread(
                            pipeline.recv_blocks, link, sink.io.kv_caches, block_ids, tag, reply.layers_per_chunk))
                        data = _WRITTEN
                        self.num_pipelined += 1
                    else:
                        data = torch.empty(sink.geometry.data_shape(len(pending.missing)),
                                           dtype=sink.geometry.dtype, device=link.device)
                        await in_thread(link.recv, data, tag)
                    ok = True
                finally:
                    self._give_back(peer, link, ok)
            finally:
                peer.slots.release()
        except BaseException:
            self.num_failed += 1
            if not pulled:  # the prefill worker still pins the prompt: ask it to let go (best effort)
                asyncio.ensure_future(self._unpin_quietly(handle))
            await self.engine.call(lambda _: sink.abort(pending))
            raise
        finally:
            self.num_importing_blocks -= len(pending.missing)
        if data is _WRITTEN:
            await self.engine.call(lambda _: sink.commit_written(pending))
        else:
            await self.engine.call(lambda _: sink.commit(pending, data))
        self.num_pulled += 1
        self.num_received_blocks += len(pending.missing)
        return len(pending.missing)

    async def _unpin_quietly(self, handle) -> None:
        try:
            await self._pull_rpc(self._peer(handle.endpoint), handle.request_id, "", [], 0)
        except Exception:
            pass  # gone or already unpinned; its TTL covers the rest

    async def _pull_rpc(self, peer: _Peer, request_id: str, link_id: str, indices: list[int], tag: int,
                        layers_per_chunk: int = 0) -> pb.PullKVReply:
        try:
            return await peer.stub.PullKV(pb.PullKVRequest(request_id=request_id, link_id=link_id,
                                                           block_indices=indices, tag=tag,
                                                           layers_per_chunk=layers_per_chunk),
                                          timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"PullKV to {peer.endpoint} failed: {e.code().name}: {e.details()}") from None

    def _peer(self, endpoint: str) -> _Peer:
        if not endpoint:
            raise KVTransferError("the KV handle names no endpoint to pull from")
        peer = self._peers.get(endpoint)
        if peer is None:
            channel = grpc.aio.insecure_channel(endpoint)
            peer = _Peer(endpoint, channel, pb_grpc.WorkerStub(channel), [],
                         slots=asyncio.Semaphore(self.config.max_links_per_peer))
            self._peers[endpoint] = peer
        return peer

    async def _take_link(self, peer: _Peer) -> KVLink:
        now = time.monotonic()
        while peer.idle:
            link = peer.idle.pop()
            if link.broken is None and not link.closed and now - link.last_used < self.config.link_idle_s:
                return link
            await self._close_link(peer, link)
        return await self._open_link(peer)

    async def _open_link(self, peer: _Peer) -> KVLink:
        link_id = uuid.uuid4().hex
        try:
            reply = await peer.stub.OpenKVLink(
                pb.OpenKVLinkRequest(link_id=link_id, peer_worker=self.engine.worker_id,
                                     geometry=geometry_to_pb(self.engine.kv_block_io.geometry)),
                timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(f"OpenKVLink to {peer.endpoint} failed: {e.code().name}: {e.details()}") from None
        return await in_thread(KVLink.connect, link_id, 1, reply.store_host, reply.store_port,
                               device=self.engine.kv_block_io.device, timeout=timedelta(seconds=self.config.link_timeout_s))

    def _give_back(self, peer: _Peer, link: KVLink, ok: bool) -> None:
        if ok and link.broken is None:
            peer.idle.append(link)
        else:
            asyncio.ensure_future(self._close_link(peer, link))

    async def _close_link(self, peer: _Peer, link: KVLink) -> None:
        link.close()
        try:
            await peer.stub.CloseKVLink(pb.CloseKVLinkRequest(link_id=link.link_id),
                                        timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError:
            pass  # the peer is gone; its side closes when its idle timer or its own failure says so

    async def close(self) -> None:
        """Retire every idle link (telling the peers) and close the control channels."""
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            for link in peer.idle:
                await self._close_link(peer, link)
            peer.idle.clear()
            await peer.channel.close()
