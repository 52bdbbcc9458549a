"""Prefix-aware placement: send a request where the longest prefix of its prompt is already cached,
unless that worker is clearly busier than the least loaded one (SGLang's cache-aware policy).

The hashes are the engine's own (:func:`shoal.workers.protocol.block_hashes`, same ``block_size``, same
extra keys), so a match here is a cache hit there. Ranking key, best first:

1. not overloaded: a worker whose load exceeds the minimum by more than ``balance_abs_threshold``
   requests AND by a factor of more than ``balance_rel_threshold`` ranks after every other worker;
2. more matched prefix tokens (a match under ``min_match_tokens`` counts as none);
3. for a prompt no worker has cached: its prefix's home (the worker its first block was last placed
   on, remembered while the prefix is in use, see :class:`PrefixHomes`), then the worker that is
   home to the fewest prefixes. A prefix evicted from its worker's cache goes back there, so the
   prefixes stay split evenly and each worker's working set stays what its cache was sized for;
4. less load;
5. a rendezvous hash of the prompt's head and the worker id: with equal matches and loads, unrelated
   prompts spread over the workers while identical heads agree on one.

When the best-matching worker is overloaded and nobody else matches, this is least load.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

from shoal.workers.protocol import KVEventBatch

from .base import BasePolicy, LoadWeights, PlacementRequest, WorkerView, healthy_only, register_policy
from .prefix_index import PrefixHomes, PrefixIndex


def _check(ok: bool, name: str, limit: str, value: object) -> None:
    if not ok:
        raise ValueError(f"prefix_aware option {name} must be {limit}, got {value!r}")


@register_policy("prefix_aware")
class PrefixAwarePolicy(BasePolicy):
    def __init__(self, block_size: int = 16, balance_abs_threshold: float = 32.0,
                 balance_rel_threshold: float = 1.5, min_match_tokens: int = 0,
                 predicted_ttl_s: float = 30.0, max_predicted_blocks: int = 65536,
                 max_blocks_per_worker: int = 4_000_000, waiting_weight: float = 1.0,
                 kv_usage_weight: float = 4.0, home_ttl_s: float = 600.0, max_homes: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        _check(block_size >= 1, "block_size", ">= 1 (and equal to the workers')", block_size)
        _check(balance_abs_threshold >= 0, "balance_abs_threshold", ">= 0", balance_abs_threshold)
        _check(balance_rel_threshold >= 1, "balance_rel_threshold", ">= 1", balance_rel_threshold)
        _check(min_match_tokens >= 0, "min_match_tokens", ">= 0", min_match_tokens)
        _check(home_ttl_s >= 0, "home_ttl_s", ">= 0 (0: no homes)", home_ttl_s)
        _check(max_homes >= 0, "max_homes", ">= 0 (0: no homes)", max_homes)
        self.block_size = block_size
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.min_match_tokens = min_match_tokens
        self.weights = LoadWeights(waiting=waiting_weight, kv_usage=kv_usage_weight)
        self.index = PrefixIndex(predicted_ttl_s, max_predicted_blocks, max_blocks_per_worker, clock)
        self.homes = PrefixHomes(home_ttl_s, max_homes, clock)

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
        useful = {wid: self._useful(matched[wid]) for wid in ids}
        hashes = request.block_hashes(self.block_size)
        home, homes = None, {}
        if hashes and not any(useful.values()):  # homes place what no one caches (and what leaves a block)
            home = self.homes.home(hashes[0])
            homes = {wid: self.homes.count(wid) for wid in ids}

        def key(wid: str) -> tuple:
            overloaded = (load[wid] - min_load > self.balance_abs_threshold
                          and load[wid] > min_load * self.balance_rel_threshold)
            tie = hashlib.blake2b(head + wid.encode(), digest_size=8).digest()
            return (overloaded, -useful[wid], wid != home, homes.get(wid, 0), load[wid], tie)

        return sorted(ids, key=key)

    def _useful(self, matched_blocks: int) -> int:
        """Matched tokens, or 0 under ``min_match_tokens``."""
        tokens = matched_blocks * self.block_size
        return tokens if tokens >= max(self.min_match_tokens, 1) else 0

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
        self.homes.remove_worker(worker_id)

    def on_request_placed(self, request: PlacementRequest, worker_id: str) -> None:
        hashes = request.block_hashes(self.block_size)
        self.index.predict(worker_id, hashes)
        if hashes:
            self.homes.place(hashes[0], worker_id)
