"""Prefix-aware placement: send a request where the longest prefix of its prompt is already cached,
unless that worker is clearly busier than the least loaded one (SGLang's cache-aware policy).

The hashes are the engine's own (:func:`shoal.workers.protocol.block_hashes`, same ``block_size``, same
extra keys), so a match here is a cache hit there. Ranking key, best first:

1. not overloaded: a worker whose load exceeds the minimum by more than ``balance_abs_threshold``
   requests AND by a factor of more than ``balance_rel_threshold`` ranks after every other worker;
2. more matched prefix tokens (a match under ``min_match_tokens`` counts as none);
3. less load;
4. a rendezvous hash of the prompt's head and the worker id: with equal matches and loads, unrelated
   prompts spread over the workers while identical heads agree on one.

When the best-matching worker is overloaded and nobody else matches, this is least load.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

from shoal.workers.protocol import KVEventBatch

from .base import BasePolicy, LoadWeights, PlacementRequest, WorkerView, healthy_only, register_policy
from .prefix_index import PrefixIndex


def _check(ok: bool, name: str, limit: str, value: object) -> None:
    if not ok:
        raise ValueError(f"prefix_aware option {name} must be {limit}, got {value!r}")


@register_policy("prefix_aware")
class PrefixAwarePolicy(BasePolicy):
    def __init__(self, block_size: int = 16, balance_abs_threshold: float = 32.0,
                 balance_rel_threshold: float = 1.5, min_match_tokens: int = 0,
                 predicted_ttl_s: float = 30.0, max_predicted_blocks: int = 65536,
                 max_blocks_per_worker: int = 4_000_000, waiting_weight: float = 1.0,
                 kv_usage_weight: float = 4.0, clock: Callable[[], float] = time.monotonic) -> None:
        _check(block_size >= 1, "block_size", ">= 1 (and equal to the workers')", block_size)
        _check(balance_abs_threshold >= 0, "balance_abs_threshold", ">= 0", balance_abs_threshold)
        _check(balance_rel_threshold >= 1, "balance_rel_threshold", ">= 1", balance_rel_threshold)
        _check(min_match_tokens >= 0, "min_match_tokens", ">= 0", min_match_tokens)
        self.block_size = block_size
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.min_match_tokens = min_match_tokens
        self.weights = LoadWeights(waiting=waiting_weight, kv_usage=kv_usage_weight)
        self.index = PrefixIndex(predicted_ttl_s, max_predicted_blocks, max_blocks_per_worker, clock)
        # Per worker, the first-block hashes of the prompts placed there: how many distinct prefixes it
        # holds (pruned once the index no longer has the block there, i.e. it was evicted).
        self._roots: dict[str, dict[bytes, None]] = {}

    # -- placement ------------------------------------------------------------------------------------

    def _hit_hashes(self, request: PlacementRequest) -> Sequence[bytes]:
        # The engine leaves at least one prompt token to compute, so it never hits on the block that
        # holds the last prompt token: (n - 1) // block_size blocks at most.
        max_blocks = max(len(request.prompt_token_ids) - 1, 0) // self.block_size
        return request.block_hashes(self.block_size)[:max_blocks]

    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        healthy = healthy_only(workers)
        if len(healthy) <= 1:
            return [w.worker_id for w in healthy]
        ids = [w.worker_id for w in healthy]
        matched = self.index.match(self._hit_hashes(request), ids)
        load = {w.worker_id: self.weights.score(w) for w in healthy}
        min_load = min(load.values())
        head = request.affinity_key()

        def key(wid: str) -> tuple:
            overloaded = (load[wid] - min_load > self.balance_abs_threshold
                          and load[wid] > min_load * self.balance_rel_threshold)
            tokens = matched[wid] * self.block_size
            useful = tokens if tokens >= max(self.min_match_tokens, 1) else 0
            # A prefix no worker holds goes to the worker holding the fewest prefixes: splitting new
            # prefixes by load alone lets one worker collect more than its share and evict them again.
            occupancy = self._num_prefixes(wid) if useful == 0 else 0
            tie = hashlib.blake2b(head + wid.encode(), digest_size=8).digest()
            return (overloaded, -useful, occupancy, load[wid], tie)

        return sorted(ids, key=key)

    def _num_prefixes(self, worker_id: str) -> int:
        roots = self._roots.get(worker_id)
        if not roots:
            return 0
        for h in [h for h in roots if self.index.match((h,), (worker_id,))[worker_id] == 0]:
            del roots[h]
        return len(roots)

    def predicted_cached_tokens(self, request: PlacementRequest, worker_id: str) -> int:
        """Prompt tokens the router expects ``worker_id`` to find in its prefix cache."""
        return self.index.match(self._hit_hashes(request), [worker_id])[worker_id] * self.block_size

    def needs_resync(self, worker_id: str) -> bool:
        """True after a ``seq`` gap: the router should resubscribe to get a fresh snapshot."""
        return self.index.needs_resync(worker_id)

    # -- hooks ----------------------------------------------------------------------------------------

    def on_kv_events(self, worker_id: str, batch: KVEventBatch) -> None:
        self.index.apply(worker_id, batch)

    def on_worker_removed(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self._roots.pop(worker_id, None)

    def on_request_placed(self, request: PlacementRequest, worker_id: str) -> None:
        hashes = request.block_hashes(self.block_size)
        self.index.predict(worker_id, hashes)
        if hashes:
            self._roots.setdefault(worker_id, {})[hashes[0]] = None
