"""Per-request block tables on top of the block pool, with automatic prefix caching.

A full block is published under its chained hash as soon as it is allocated for the step that fills it:
within one forward pass every layer writes the batch's new keys/values before any token attends, so a
request scheduled in the same step (an ``n > 1`` sibling) may already reuse it. Under async scheduling
a block whose last tokens are placeholders (ids not known yet) has no hash yet: it is published late,
by :meth:`KVCacheManager.publish_computed`, once those ids are known.
"""

from __future__ import annotations

from .block_pool import BlockCounts, BlockPool, KVBlock
from .request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching, record_events)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._ids: dict[str, list[int]] = {}  # the same blocks' ids: read every step, built once
        self._num_hashed: dict[str, int] = {}  # how many of a request's blocks are published

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (only when no request holds a block: False otherwise)."""
        return self.pool.reset_prefix_cache()

    def block_counts(self) -> BlockCounts:
        """Total / free / cached / in-use blocks of the pool (what metrics and leak checks read)."""
        return self.pool.counts()

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the manager's own list: do not modify)."""
        return self._ids.get(request_id, [])

    def num_blocks(self, request_id: str) -> int:
        return len(self._ids.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a new request, in whole blocks, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[KVBlock] = []
        max_blocks = (request.num_tokens - 1) // self.block_size
        for h in request.block_hashes(self.block_size)[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones; False if blocks run out.

        ``computed_blocks`` are prefix hits (from :meth:`get_computed_blocks`) for a request that holds
        no blocks yet; they count as computed tokens.
        """
        held = self._blocks.get(request.request_id)
        if held is not None and not computed_blocks:
            # The common decode step: the token fits in a block the request already holds.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(held) * self.block_size:
                if total // self.block_size > self._num_hashed.get(request.request_id, 0):
                    self._publish_full_blocks(request, held, total)
                return True
        held = self._blocks.setdefault(request.request_id, [])
        ids = self._ids.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        needed = -(-total // self.block_size) - len(held) - len(computed_blocks)
        # hits sitting in the free queue stop being allocatable once we take them
        evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - evictable_hits:
            if not held:
                del self._blocks[request.request_id]
                del self._ids[request.request_id]
            return False
        self.pool.touch(computed_blocks)
        held.extend(computed_blocks)
        if needed > 0:
            held.extend(self.pool.allocate(needed))
        if len(ids) < len(held):
            ids.extend(b.block_id for b in held[len(ids):])
        self._publish_full_blocks(request, held, total)
        return True

    def publish_computed(self, request: Request) -> None:
        """Publish the request's scheduled full blocks whose token ids are all known by now."""
        held = self._blocks.get(request.request_id)
        if held:
            self._publish_full_blocks(request, held, request.num_computed_tokens)

    def _publish_full_blocks(self, request: Request, held: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        start = self._num_hashed.get(request.request_id, 0)
        # Only blocks of known tokens: a placeholder's id (async scheduling) is not hashable yet.
        end = min(num_tokens, request.num_tokens) // self.block_size
        if end <= start:
            return
        hashes = request.block_hashes(self.block_size)
        for i in range(start, end):
            self.pool.cache(held[i], hashes[i])
        self._num_hashed[request.request_id] = end

    def free(self, request: Request) -> None:
        """Return a request's blocks, tail first, so its prefix outlives its suffix in the LRU."""
        blocks = self._blocks.pop(request.request_id, [])
        self._ids.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        self.pool.release(reversed(blocks))

    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self._blocks.values())

    def check_no_leak(self) -> None:
        """After all requests finished: every block is back in the free queue (cached or not)."""
        self.pool.check_invariants()
        if self._blocks or self.pool.num_free_blocks != self.pool.num_blocks:
            raise AssertionError(
                f"KV block leak: {self.pool.num_blocks - self.pool.num_free_blocks} blocks held by "
                f"{sorted(self._blocks)}")
