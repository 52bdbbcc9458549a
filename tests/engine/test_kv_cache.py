"""Block pool and KV cache manager on CPU: ref counts, prefix hits, LRU eviction, no leaks."""

from __future__ import annotations

import pytest

from shoal.workers.engine.block_pool import BlockPool
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.engine.request import Request
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import block_hashes, hash_block


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def test_hash_chains_parent_tokens_and_extra_keys():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second block, different parent
    assert block_hashes([1, 2, 3, 4, 5], 4) == a[:1]  # the partial block has no hash
    assert hash_block(None, [1, 2, 3, 4], ("lora-a",)) != a[0]
    # extending a chain from its middle gives the same hashes as hashing from scratch
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_prefix_hit_shares_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = req("a", list(range(12)))
    assert kv.allocate_slots(first, 12)
    first.num_computed_tokens = 12
    second = req("b", list(range(12)))  # same 12 tokens: 3 full blocks cached
    hits, n = kv.get_computed_blocks(second)
    assert n == 8 and len(hits) == 2  # capped so the last token is computed and sampled
    second_longer = req("c", list(range(13)))
    hits, n = kv.get_computed_blocks(second_longer)
    assert n == 12 and [b.block_id for b in hits] == kv.block_ids("a")
    assert kv.allocate_slots(second_longer, 1, hits)
    assert kv.block_ids("c")[:3] == kv.block_ids("a")
    assert all(b.ref_cnt == 2 for b in hits)
    kv.free(first)
    kv.free(second_longer)
    kv.check_no_leak()
    assert kv.pool.num_cached_blocks == 3  # freed, but still reusable


def test_lru_evicts_least_recently_freed_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = req("a", [1, 2, 3, 4]), req("b", [5, 6, 7, 8])
    for r in (a, b):
        assert kv.allocate_slots(r, 4)
    kv.free(a)
    kv.free(b)
    c = req("c", [9, 10])
    assert kv.allocate_slots(c, 2)
    # a was freed first, its tail block first: a's second block is gone, its first still cached
    assert kv.get_computed_blocks(req("x", [1, 2, 3, 4, 0]))[1] == 2
    assert kv.get_computed_blocks(req("y", [5, 6, 7, 8, 0]))[1] == 4
    kv.free(c)
    kv.check_no_leak()


def test_allocation_fails_cleanly_when_pool_is_full():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert not kv.allocate_slots(req("big", list(range(9))), 9)
    assert kv.num_free_blocks == 2 and kv.num_held_blocks() == 0
    kv.check_no_leak()


def test_hits_in_free_queue_count_against_capacity():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = req("a", [1, 2, 3, 4])
    assert kv.allocate_slots(a, 4)
    kv.free(a)  # 2 cached blocks now sit in the free queue, 3 free in all
    b = req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hits, n = kv.get_computed_blocks(b)
    assert n == 4
    # b needs 5 blocks: 2 hits + 3 new, but only 1 block is free besides the hits
    assert not kv.allocate_slots(b, 5, hits)
    assert kv.num_free_blocks == 3
    kv.check_no_leak()


def test_events_report_stored_and_removed_hashes():
    pool = BlockPool(2, record_events=True)
    (blk,) = pool.allocate(1)
    pool.cache(blk, b"h1")
    pool.release([blk])
    pool.allocate(2)  # evicts the cached block
    kinds = [(e.kind, e.block_hashes) for e in pool.take_events()]
    assert kinds == [("stored", (b"h1",)), ("removed", (b"h1",))]


def test_release_more_than_taken_is_an_error():
    pool = BlockPool(1)
    (blk,) = pool.allocate(1)
    pool.release([blk])
    with pytest.raises(RuntimeError):
        pool.release([blk])


def test_a_reused_prefix_outlives_one_off_blocks():
    """SLRU: blocks whose prefix was hit wait in the protected queue; one-off blocks (cached, never
    hit) are evicted first, even when they were freed more recently."""
    pool = BlockPool(4, protected_fraction=0.5)
    shared, once = pool.allocate(2)
    pool.cache(shared, b"shared"), pool.cache(once, b"once")
    pool.release([once, shared])  # freed: shared is the most recent, yet it was never hit either
    pool.touch([pool.lookup(b"shared")])  # a prefix hit: shared is now reused
    pool.release([shared])
    fresh = pool.allocate(2)  # the two never-cached blocks go first
    pool.release(fresh)  # ... and return as the most recently used
    taken = pool.allocate(3)
    assert shared not in taken and once in taken  # probation (once, fresh) before protected (shared)
    assert pool.lookup(b"shared") is shared and pool.lookup(b"once") is None
    pool.release(taken)
    pool.check_invariants()
    # The protected queue is bounded: past protected_fraction its oldest block goes on probation.
    for block, h in zip(pool.allocate(3), (b"a", b"b", b"c")):
        pool.cache(block, h)
        pool.release([block])
        pool.touch([block])
        pool.release([block])
    assert pool.num_free_blocks == 4 and len(pool._protected) == 2
    pool.check_invariants()
