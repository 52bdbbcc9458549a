"""The pool of KV blocks: reference counts, the prefix cache (hash -> block) and LRU eviction.

Every block is owned by exactly one of: running requests (``ref_cnt > 0``), or the free queue
(``ref_cnt == 0``; it may still hold a cached prefix, reusable until evicted). Blocks come back to the
free queue in LRU order, so the least recently used cached prefix is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


@dataclass(frozen=True)
class KVEvent:
    """A change in the set of cached block hashes (what the router's prefix index follows)."""

    kind: str  # "stored" | "removed"
    block_hashes: tuple[bytes, ...]


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, record_events: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self._record_events = record_events
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones and evictable cached ones)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling them off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; a block nobody holds joins the free queue's most-recent end."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} released more often than taken")
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block under its hash; a hash already cached keeps its first block."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._emit("stored", block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no request holds a block."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            self._evict(block)
        return True

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def snapshot(self) -> tuple[bytes, ...]:
        return tuple(self._cached)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self._emit("removed", block.block_hash)
            block.block_hash = None

    def _emit(self, kind: str, block_hash: bytes) -> None:
        if self._record_events:
            self._events.append(KVEvent(kind, (block_hash,)))

    def check_invariants(self) -> None:
        """Every block is either referenced or free, never both; raises if the books disagree."""
        for block in self.blocks:
            in_free = block.block_id in self._free
            if (block.ref_cnt == 0) != in_free:
                raise AssertionError(f"block {block.block_id}: ref_cnt={block.ref_cnt}, in free queue={in_free}")
        for h, block in self._cached.items():
            if block.block_hash != h:
                raise AssertionError(f"cache entry for block {block.block_id} has a stale hash")
