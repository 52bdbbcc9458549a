"""The pool of KV blocks: reference counts, the prefix cache (hash -> block) and eviction.

Every block is owned by exactly one of: running requests (``ref_cnt > 0``), or a free queue
(``ref_cnt == 0``; it may still hold a cached prefix, reusable until evicted).

Eviction is segmented LRU (SLRU / 2Q): a free block whose cached prefix was hit at least once (a
shared system prompt, a document several questions ask about) waits in the *protected* queue; every
other free block (never cached, or cached and never hit: the unique tail of a finished request) in the
*probation* queue, which is evicted first. Each queue is LRU. The protected queue holds at most
``protected_fraction`` of the pool; beyond it its least recently used block moves to probation, so a
prefix that stops being asked for still ages out. Plain LRU would let every request's one-off tail
push a popular prefix out of a full cache.
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
    reused: bool = False  # its cached prefix was hit since it was cached (protected when free)


@dataclass(frozen=True, slots=True)
class BlockCounts:
    """The pool's books at one moment. ``in_use + free == total``; ``cached`` overlaps both (a cached
    block is held by a request or waits evictable in a free queue). At rest (no request, no pin, no
    import) ``in_use == 0``: anything else is a leak."""

    total: int
    free: int  # can be handed out now: never-cached and evictable cached blocks
    cached: int  # hold a prefix-cache hash
    in_use: int  # ref_cnt > 0: held by running requests, pinned exports or imports


@dataclass(frozen=True)
class KVEvent:
    """A change in the set of cached block hashes (what the router's prefix index follows)."""

    kind: str  # "stored" | "removed"
    block_hashes: tuple[bytes, ...]


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, record_events: bool = False,
                 protected_fraction: float = 0.9):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Free blocks, least recently used first: probation is evicted before protected.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._protected: OrderedDict[int, KVBlock] = OrderedDict()
        self._max_protected = int(protected_fraction * num_blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self._record_events = record_events
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free ones and evictable cached ones)."""
        return len(self._free) + len(self._protected)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some owner holds (``ref_cnt > 0``)."""
        return self.num_blocks - self.num_free_blocks

    def counts(self) -> BlockCounts:
        free = self.num_free_blocks
        return BlockCounts(self.num_blocks, free, len(self._cached), self.num_blocks - free)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            _, block = (self._free or self._protected).popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling them off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                (self._protected if block.block_id in self._protected else self._free).pop(block.block_id)
            block.ref_cnt += 1
            if block.block_hash is not None:
                block.reused = True

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; a block nobody holds joins the free queue's most-recent end."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} released more often than taken")
            if block.ref_cnt == 0:
                self._enqueue_free(block)

    def _enqueue_free(self, block: KVBlock) -> None:
        if not (block.reused and block.block_hash is not None):
            self._free[block.block_id] = block
            return
        self._protected[block.block_id] = block
        while len(self._protected) > self._max_protected:  # the oldest protected block goes on probation
            _, old = self._protected.popitem(last=False)
            old.reused = False
            self._free[old.block_id] = old

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full block under its hash; a hash already cached keeps its first block."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._emit("stored", block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no request holds a block."""
        if self.num_free_blocks != self.num_blocks:
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
        block.reused = False

    def _emit(self, kind: str, block_hash: bytes) -> None:
        if self._record_events:
            self._events.append(KVEvent(kind, (block_hash,)))

    def check_invariants(self) -> None:
        """Every block is either referenced or free, never both; raises if the books disagree."""
        for block in self.blocks:
            in_free = (block.block_id in self._free) + (block.block_id in self._protected)
            if in_free > 1:
                raise AssertionError(f"block {block.block_id} is in both free queues")
            if (block.ref_cnt == 0) != bool(in_free):
                raise AssertionError(f"block {block.block_id}: ref_cnt={block.ref_cnt}, in free queue={in_free}")
        for h, block in self._cached.items():
            if block.block_hash != h:
                raise AssertionError(f"cache entry for block {block.block_id} has a stale hash")
