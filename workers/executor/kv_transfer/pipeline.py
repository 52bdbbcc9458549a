"""Pipelined KV block transfer over a :class:`KVLink`: the blocks go in chunks of layers, so gathering
chunk i+1 overlaps chunk i on the wire, and scattering chunk i overlaps chunk i+1 arriving.

The plain path (``gather_blocks`` -> ``send`` -> ``recv`` -> ``scatter_blocks``) runs its three steps
one after another: the wire idles during the gather and the scatter. Here only the first chunk's
gather and the last chunk's scatter are not hidden.

Both ends must call with the same block count, cache geometry and ``layers_per_chunk``: chunks are
matched in order (NCCL ignores tags; gloo matches equal tags first come, first served), and the
caller's handshake is what checks the geometry (the workers' ``OpenKVLink`` compares geometries).

Chunks move through a ring of ``NUM_BUFFERS`` buffers of ``[layers_per_chunk, 2, n_blocks,
block_size, kv_heads, head_dim]``, not a whole-request buffer. A buffer is refilled only after the
operation that last read it finished:

- CUDA: everything is posted at once and ordered by streams. Gathers and scatters run on a side
  stream; the link's sends/receives start after the current stream's work so far (NCCL's rule), so
  the current stream is made to wait for the gather of a chunk before its send is posted, and for the
  scatter of chunk i-NUM_BUFFERS before the receive that overwrites its buffer. The host then waits
  for the link's operations (with the link's deadline); on return the current stream is ordered after
  the scatters, like ``scatter_blocks``'s asynchronous copies.
- CPU (gloo): gloo moves data on its own threads, so the host gathers/scatters one chunk while the
  link's posted operation moves another.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .import_blocks import KVCache, KVGeometry
from .link import KVLink

NUM_BUFFERS = 2  # one on the wire, one being gathered (or scattered): enough while the wire is slowest


def layer_chunks(num_layers: int, layers_per_chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) layer ranges, in the order both ends move them; the last may be shorter."""
    if layers_per_chunk < 1:
        raise ValueError(f"layers_per_chunk must be >= 1, got {layers_per_chunk}")
    return [(lo, min(lo + layers_per_chunk, num_layers)) for lo in range(0, num_layers, layers_per_chunk)]


def send_blocks(link: KVLink, kv_caches: Sequence[KVCache], block_ids: Sequence[int], tag: int,
                layers_per_chunk: int) -> None:
    """Send ``block_ids`` of every layer, chunk by chunk; returns when the last chunk was sent."""
    _transfer("send", _send_cuda, _send_host, link, kv_caches, block_ids, tag, layers_per_chunk)


def recv_blocks(link: KVLink, kv_caches: Sequence[KVCache], block_ids: Sequence[int], tag: int,
                layers_per_chunk: int) -> None:
    """Receive into ``block_ids`` of every layer what the peer's :func:`send_blocks` sends."""
    _transfer("recv", _recv_cuda, _recv_host, link, kv_caches, block_ids, tag, layers_per_chunk)


def _transfer(what: str, on_cuda, on_host, link: KVLink, kv_caches: Sequence[KVCache],
              block_ids: Sequence[int], tag: int, layers_per_chunk: int) -> None:
    plan = _Plan.of(link, kv_caches, block_ids, layers_per_chunk)
    if plan is None:
        return
    with _breaks_link_on_error(link, f"pipelined {what}"):
        if plan.device.type == "cuda":
            with torch.cuda.device(plan.device):  # the caller's thread may have another current device
                on_cuda(link, kv_caches, plan, tag)
        else:
            on_host(link, kv_caches, plan, tag)


class _Plan:
    """The chunks, the block index and the buffer ring of one transfer."""

    def __init__(self, kv_caches: Sequence[KVCache], block_ids: Sequence[int], layers_per_chunk: int):
        geo = KVGeometry.of(kv_caches)
        self.chunks = layer_chunks(geo.num_layers, layers_per_chunk)
        self.device = kv_caches[0][0].device
        self.idx = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        rows = min(layers_per_chunk, geo.num_layers)
        # buffer: [rows, 2, n_blocks, block_size, kv_heads, head_dim]
        self.buffers = [torch.empty((rows,) + geo.data_shape(len(block_ids))[1:], dtype=geo.dtype,
                                    device=self.device) for _ in range(min(NUM_BUFFERS, len(self.chunks)))]

    @classmethod
    def of(cls, link: KVLink, kv_caches: Sequence[KVCache], block_ids: Sequence[int],
           layers_per_chunk: int) -> "_Plan | None":
        """The plan, or None when there is nothing to move (both ends then skip the transfer)."""
        layer_chunks(1, layers_per_chunk)  # validates before anything is posted
        KVGeometry.of(kv_caches)  # at least one layer
        device = kv_caches[0][0].device
        other_gpu = None not in (device.index, link.device.index) and device.index != link.device.index
        if device.type != link.device.type or other_gpu:
            raise ValueError(f"the KV caches are on {device}, the link's end on {link.device}")
        if not block_ids:
            return None
        return cls(kv_caches, block_ids, layers_per_chunk)

    def buffer(self, i: int) -> torch.Tensor:
        """Chunk i's slot of the ring: [hi - lo, 2, n_blocks, block_size, kv_heads, head_dim]."""
        lo, hi = self.chunks[i]
        return self.buffers[i % len(self.buffers)][: hi - lo]


def _gather_into(kv_caches: Sequence[KVCache], lo: int, idx: torch.Tensor, out: torch.Tensor) -> None:
    for j in range(out.shape[0]):
        k, v = kv_caches[lo + j]
        torch.index_select(k, 0, idx, out=out[j, 0])
        torch.index_select(v, 0, idx, out=out[j, 1])


def _scatter_from(kv_caches: Sequence[KVCache], lo: int, idx: torch.Tensor, data: torch.Tensor) -> None:
    for j in range(data.shape[0]):
        k, v = kv_caches[lo + j]
        k.index_copy_(0, idx, data[j, 0])
        v.index_copy_(0, idx, data[j, 1])


# -- CPU: the host overlaps gloo's threads -----------------------------------------------------------

def _send_host(link: KVLink, kv_caches: Sequence[KVCache], plan: _Plan, tag: int) -> None:
    ring, works = len(plan.buffers), []
    for i, (lo, _) in enumerate(plan.chunks):
        if i >= ring:
            link.wait(works[i - ring], "send")  # its buffer is refilled next
        _gather_into(kv_caches, lo, plan.idx, plan.buffer(i))
        works.append(link.isend(plan.buffer(i), tag))
    for work in works[max(0, len(works) - ring):]:
        link.wait(work, "send")


def _recv_host(link: KVLink, kv_caches: Sequence[KVCache], plan: _Plan, tag: int) -> None:
    ring, n = len(plan.buffers), len(plan.chunks)
    works = [None] * n

    def post(i: int) -> None:  # chunk i's buffer last held chunk i - ring, scattered already
        works[i] = link.irecv(plan.buffer(i), tag)

    for i in range(ring - 1):
        post(i)
    for i, (lo, _) in enumerate(plan.chunks):
        if i + ring - 1 < n:
            post(i + ring - 1)
        link.wait(works[i], "recv")
        _scatter_from(kv_caches, lo, plan.idx, plan.buffer(i))


# -- CUDA: everything posted at once, ordered by streams ---------------------------------------------

def _send_cuda(link: KVLink, kv_caches: Sequence[KVCache], plan: _Plan, tag: int) -> None:
    main = torch.cuda.current_stream(plan.device)
    side = torch.cuda.Stream(device=plan.device)
    side.wait_stream(main)  # the block index, and every earlier write to the caches
    ring, works = len(plan.buffers), []
    for i, (lo, _) in enumerate(plan.chunks):
        with torch.cuda.stream(side):
            if i >= ring:
                works[i - ring].wait()  # stream-only: the send that read this buffer has finished
            _gather_into(kv_caches, lo, plan.idx, plan.buffer(i))
            gathered = torch.cuda.Event()
            gathered.record(side)
        main.wait_event(gathered)  # the send posted next starts after main's work so far
        works.append(link.isend(plan.buffer(i), tag))
    for work in works:
        link.wait(work, "send")
    main.wait_stream(side)


def _recv_cuda(link: KVLink, kv_caches: Sequence[KVCache], plan: _Plan, tag: int) -> None:
    main = torch.cuda.current_stream(plan.device)
    side = torch.cuda.Stream(device=plan.device)
    side.wait_stream(main)
    ring, n = len(plan.buffers), len(plan.chunks)
    works, scattered = [None] * n, [None] * n

    def post(i: int) -> None:
        if i >= ring:
            main.wait_event(scattered[i - ring])  # the receive overwrites what that scatter read
        works[i] = link.irecv(plan.buffer(i), tag)

    for i in range(ring - 1):
        post(i)
    for i, (lo, _) in enumerate(plan.chunks):
        if i + ring - 1 < n:
            post(i + ring - 1)
        with torch.cuda.stream(side):
            works[i].wait()  # stream-only: the scatter starts once chunk i has arrived
            _scatter_from(kv_caches, lo, plan.idx, plan.buffer(i))
            scattered[i] = torch.cuda.Event()
            scattered[i].record(side)
    for work in works:
        link.wait(work, "recv")
    main.wait_stream(side)  # the caller's next work on the caches comes after the scatters


@contextlib.contextmanager
def _breaks_link_on_error(link: KVLink, what: str):
    """Operations may be posted when something fails: the two ends are out of step from then on."""
    try:
        yield
    except BaseException as e:
        if link.broken is None:
            link.broken = f"{what}: {type(e).__name__}: {e}"
        raise
