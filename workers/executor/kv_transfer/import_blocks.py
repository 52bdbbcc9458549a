"""Export and import of a prompt's paged KV blocks between two engines' caches.

The unit of transfer is a *full* prompt block, named by its chained hash (``shoal.workers.protocol``):
equal hashes mean equal prefixes, so a block imported under its hash is exactly what the decode engine
would have computed itself, and a plain ``add_request`` of the same prompt finds it as a prefix hit.

Ownership (the design's invariant: every block has exactly one owner). While a transfer is in flight,
its blocks hold a reference on both sides:

- prefill side: :class:`ExportedPrefix` pins the cached blocks (``ref_cnt + 1``) so LRU eviction cannot
  recycle them mid-send; :meth:`KVSource.release` drops the pin.
- decode side: :class:`PendingImport` holds freshly allocated blocks (``ref_cnt == 1``, no hash, so no
  request can see half-written data) plus a pin on the blocks it already had (so allocating the new ones
  cannot evict them); :meth:`KVSink.commit` publishes the new blocks under their hashes and drops every
  reference, leaving them in the prefix cache (``ref_cnt == 0``, LRU); :meth:`KVSink.abort` drops the
  references without publishing.

Only blocks the decode side lacks travel: the sink names them by index into the prompt's hash list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shoal.workers.engine.block_pool import KVBlock
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.protocol import block_hashes

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v): [num_blocks, block_size, num_kv_heads, head_dim]


class KVTransferError(RuntimeError):
    """A transfer could not complete; the decode side imported nothing and leaked nothing."""


def transferable_hashes(prompt_token_ids: Sequence[int], block_size: int, extra_keys: tuple = ()) -> list[bytes]:
    """Hashes of the prompt blocks worth sending: full blocks, leaving >= 1 prompt token to compute.

    The same cap as ``KVCacheManager.get_computed_blocks``: a block the decode engine would never use
    as a prefix hit (the last one of a block-aligned prompt) is not worth its bytes.
    """
    max_blocks = max(len(prompt_token_ids) - 1, 0) // block_size
    return block_hashes(list(prompt_token_ids)[: max_blocks * block_size], block_size, extra_keys)


@dataclass(frozen=True)
class KVGeometry:
    """What must agree between two caches for a block to be copied as raw bytes."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, kv_caches: Sequence[KVCache]) -> "KVGeometry":
        if not kv_caches:
            raise ValueError("kv_caches must hold at least one layer")
        k = kv_caches[0][0]
        _, block_size, heads, head_dim = k.shape
        return cls(len(kv_caches), block_size, heads, head_dim, k.dtype)

    def data_shape(self, n_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, n_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def check_same(self, other: "KVGeometry") -> None:
        if self != other:
            raise ValueError(f"KV cache geometry differs between the engines: {self} vs {other} "
                             f"(same model, block_size and dtype are required; TP sizes may differ)")


def gather_blocks(kv_caches: Sequence[KVCache], block_ids: Sequence[int]) -> torch.Tensor:
    """Copy blocks out of every layer's cache.

    Returns data: [num_layers, 2, n_blocks, block_size, num_kv_heads, head_dim] (contiguous, on the
    caches' device), so one send moves a whole request.
    """
    geo = KVGeometry.of(kv_caches)
    device = kv_caches[0][0].device
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    out = torch.empty(geo.data_shape(len(idx)), dtype=geo.dtype, device=device)
    for layer, (k, v) in enumerate(kv_caches):
        torch.index_select(k, 0, idx, out=out[layer, 0])
        torch.index_select(v, 0, idx, out=out[layer, 1])
    return out


def scatter_blocks(kv_caches: Sequence[KVCache], block_ids: Sequence[int], data: torch.Tensor) -> None:
    """Write ``data`` ([num_layers, 2, n_blocks, block_size, kv_heads, head_dim]) into ``block_ids``."""
    geo = KVGeometry.of(kv_caches)
    expected = geo.data_shape(len(block_ids))
    if tuple(data.shape) != expected or data.dtype != geo.dtype:
        raise ValueError(f"KV data has shape {tuple(data.shape)} / {data.dtype}, the cache expects "
                         f"{expected} / {geo.dtype}")
    device = kv_caches[0][0].device
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    data = data.to(device, non_blocking=True)
    for layer, (k, v) in enumerate(kv_caches):
        k.index_copy_(0, idx, data[layer, 0])
        v.index_copy_(0, idx, data[layer, 1])


class CacheBlockIO:
    """Block reads and writes on one process's whole KV cache (TP=1: the runner's caches are the model's).

    The shape of what a source gathers and a sink scatters is always the *whole* model's
    ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]``; a tensor-parallel engine implements the
    same three members by gathering its ranks' head shards (``tp_group.TPBlockIO``), so prefill and
    decode may run different TP sizes.
    """

    def __init__(self, kv_caches: Sequence[KVCache]):
        self.kv_caches = kv_caches
        self.geometry = KVGeometry.of(kv_caches)
        self.device = kv_caches[0][0].device

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        return gather_blocks(self.kv_caches, block_ids)

    def scatter(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        scatter_blocks(self.kv_caches, block_ids, data)


# -- prefill side ------------------------------------------------------------------------------------

@dataclass(eq=False)
class ExportedPrefix:
    """A prompt's cached blocks, pinned on the prefill engine until :meth:`KVSource.release`."""

    hashes: list[bytes]
    blocks: list[KVBlock]  # blocks[i] holds hashes[i]

    @property
    def block_ids(self) -> tuple[int, ...]:
        return tuple(b.block_id for b in self.blocks)


class KVSource:
    """The prefill engine's side: pin a computed prompt's blocks, gather the ones asked for."""

    def __init__(self, kv_cache: KVCacheManager, io: "CacheBlockIO"):
        if not kv_cache.enable_prefix_caching:
            raise ValueError("KV export needs enable_prefix_caching=True on the prefill engine "
                             "(blocks are found by their hashes)")
        self.kv_cache, self.io = kv_cache, io
        self.geometry = io.geometry
        if self.geometry.block_size != kv_cache.block_size:
            raise ValueError(f"block_size of the cache tensors ({self.geometry.block_size}) != the "
                             f"manager's ({kv_cache.block_size})")

    @classmethod
    def of_engine(cls, engine) -> "KVSource":
        """An ``LLMEngine``'s source (any TP size: ``engine.kv_block_io`` gathers whole heads)."""
        return cls(engine.kv_cache, engine.kv_block_io)

    def pin(self, prompt_token_ids: Sequence[int], extra_keys: tuple = ()) -> ExportedPrefix:
        """Pin every transferable block of a prompt the engine has computed; raises if one is missing."""
        hashes = transferable_hashes(prompt_token_ids, self.kv_cache.block_size, extra_keys)
        pool = self.kv_cache.pool
        blocks = []
        for i, h in enumerate(hashes):
            block = pool.lookup(h)
            if block is None:
                raise KVTransferError(f"prompt block {i} of {len(hashes)} is not in the prefill engine's "
                                      f"prefix cache (not computed yet, or evicted)")
            blocks.append(block)
        pool.touch(blocks)
        return ExportedPrefix(hashes, blocks)

    def gather(self, exported: ExportedPrefix, indices: Sequence[int]) -> torch.Tensor:
        """data: [num_layers, 2, len(indices), block_size, kv_heads, head_dim] of the asked-for blocks."""
        bad = [i for i in indices if not 0 <= i < len(exported.blocks)]
        if bad:
            raise ValueError(f"block indices {bad} are outside the exported prefix of "
                             f"{len(exported.blocks)} blocks")
        return self.io.gather([exported.blocks[i].block_id for i in indices])

    def release(self, exported: ExportedPrefix) -> None:
        """Drop the pin, tail first (like ``KVCacheManager.free``); idempotent."""
        blocks, exported.blocks = exported.blocks, []
        self.kv_cache.pool.release(reversed(blocks))


# -- decode side -------------------------------------------------------------------------------------

@dataclass(eq=False)
class PendingImport:
    """Blocks reserved on the decode engine for one transfer, until commit or abort."""

    hashes: list[bytes]
    missing: list[int]  # indices into hashes that must be received, ascending
    new_blocks: list[KVBlock]  # new_blocks[j] receives hashes[missing[j]]; ref_cnt 1, no hash yet
    present: list[KVBlock]  # blocks the engine already had, pinned so the allocation cannot evict them
    done: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)


class KVSink:
    """The decode engine's side: reserve blocks for what it lacks, then write and publish them."""

    def __init__(self, kv_cache: KVCacheManager, io: "CacheBlockIO"):
        if not kv_cache.enable_prefix_caching:
            raise ValueError("KV import needs enable_prefix_caching=True on the decode engine "
                             "(imported blocks become prefix-cache hits)")
        self.kv_cache, self.io = kv_cache, io
        self.geometry = io.geometry

    @classmethod
    def of_engine(cls, engine) -> "KVSink":
        return cls(engine.kv_cache, engine.kv_block_io)

    def begin(self, prompt_token_ids: Sequence[int], extra_keys: tuple = ()) -> PendingImport:
        """Reserve a block for each transferable prompt block not already cached here.

        Raises ``KVTransferError`` (reserving nothing) if the free pool cannot hold them.
        """
        hashes = transferable_hashes(prompt_token_ids, self.kv_cache.block_size, extra_keys)
        pool = self.kv_cache.pool
        present, missing = [], []
        for i, h in enumerate(hashes):
            block = pool.lookup(h)
            if block is None:
                missing.append(i)
            else:
                present.append(block)
        evictable_present = sum(1 for b in present if b.ref_cnt == 0)
        available = pool.num_free_blocks - evictable_present
        if len(missing) > available:
            raise KVTransferError(f"decode engine has {available} free KV blocks, the transfer "
                                  f"needs {len(missing)}")
        pool.touch(present)
        return PendingImport(hashes, missing, pool.allocate(len(missing)), present)

    def commit(self, pending: PendingImport, data: torch.Tensor | None) -> None:
        """Write the received blocks, publish them under their hashes, release every reference.

        data: [num_layers, 2, len(pending.missing), block_size, kv_heads, head_dim]; None when nothing
        was missing.
        """
        self._check_open(pending)
        if data is None:
            if pending.missing:
                raise ValueError(f"the import lacks {len(pending.missing)} blocks but no data came")
            self._release(pending)
            return
        try:
            self.io.scatter([b.block_id for b in pending.new_blocks], data)
        except BaseException:
            self.abort(pending)
            raise
        for j, i in enumerate(pending.missing):
            self.kv_cache.pool.cache(pending.new_blocks[j], pending.hashes[i])
        self._release(pending)

    def commit_written(self, pending: PendingImport) -> None:
        """Publish blocks the transfer already wrote into ``pending.new_blocks`` (a pipelined receive)."""
        self._check_open(pending)
        for j, i in enumerate(pending.missing):
            self.kv_cache.pool.cache(pending.new_blocks[j], pending.hashes[i])
        self._release(pending)

    def abort(self, pending: PendingImport) -> None:
        """Give back the reservation; the unpublished blocks return to the free pool. Idempotent."""
        if not pending.done:
            self._release(pending)

    def _release(self, pending: PendingImport) -> None:
        pending.done = True
        # Prompt order, tail first: the prefix outlives its suffix in the LRU, as after a request.
        by_index = dict(zip(pending.missing, pending.new_blocks))
        present = iter(pending.present)
        ordered = [by_index[i] if i in by_index else next(present) for i in range(pending.num_blocks)]
        self.kv_cache.pool.release(reversed(ordered))

    @staticmethod
    def _check_open(pending: PendingImport) -> None:
        if pending.done:
            raise KVTransferError("this import was already committed or aborted")
