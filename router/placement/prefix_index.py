"""The router's picture of which worker caches which KV blocks, keyed by the engine's block hash.

Two sources feed it:

* confirmed: each worker's KV event stream. A ``snapshot`` batch replaces the worker's set; ``stored``
  and ``removed`` batches add and drop hashes. Batches carry ``seq`` (one more per batch): a gap means
  an event was lost, so the worker's set is marked stale and counts as empty until the next snapshot
  (a wrong "cached" guess costs a full prefill on a busy worker; an empty one only costs affinity).
* predicted: this router's own placements. A request placed on a worker will leave its prompt blocks
  there, so they count as present at once; a burst of same-prefix requests then sticks to one worker
  before its events arrive. Predictions expire after a TTL and are capped per worker (LRU).

Memory: confirmed sets mirror a worker's cache, which its block count bounds (a worker reporting more
than ``max_blocks_per_worker`` is marked stale: it is missing removals); predictions are capped.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

from shoal.workers.protocol import KVEventBatch

_NO_HOLDERS: frozenset = frozenset()
_NO_PREDICTIONS: dict = {}  # read-only


class PrefixIndex:
    def __init__(self, predicted_ttl_s: float = 30.0, max_predicted_blocks: int = 65536,
                 max_blocks_per_worker: int = 4_000_000, clock: Callable[[], float] = time.monotonic):
        if predicted_ttl_s < 0:
            raise ValueError(f"predicted_ttl_s must be >= 0, got {predicted_ttl_s}")
        if max_predicted_blocks < 0:
            raise ValueError(f"max_predicted_blocks must be >= 0, got {max_predicted_blocks}")
        if max_blocks_per_worker < 1:
            raise ValueError(f"max_blocks_per_worker must be >= 1, got {max_blocks_per_worker}")
        self.predicted_ttl_s = predicted_ttl_s
        self.max_predicted_blocks = max_predicted_blocks
        self.max_blocks_per_worker = max_blocks_per_worker
        self.clock = clock
        self._confirmed: dict[bytes, set[str]] = {}  # hash -> workers whose events say they hold it
        self._confirmed_by_worker: dict[str, set[bytes]] = {}
        self._predicted: dict[bytes, dict[str, float]] = {}  # hash -> worker -> expiry time
        self._predicted_by_worker: dict[str, OrderedDict[bytes, float]] = {}  # oldest expiry first
        self._seq: dict[str, int] = {}  # last applied batch per worker
        self._stale: set[str] = set()

    # -- KV events ------------------------------------------------------------------------------------

    def apply(self, worker_id: str, batch: KVEventBatch) -> None:
        if batch.kind == "snapshot":
            self._clear_confirmed(worker_id)
            self._stale.discard(worker_id)
            self._seq[worker_id] = batch.seq
            self._add(worker_id, batch.block_hashes)
            return
        if batch.kind not in ("stored", "removed"):
            raise ValueError(f"KVEventBatch.kind must be 'snapshot', 'stored' or 'removed', got {batch.kind!r}")
        if worker_id in self._stale:
            return  # deltas on top of an unknown base mean nothing; wait for the snapshot
        last = self._seq.get(worker_id)
        if last is None or batch.seq != last + 1:
            self.mark_stale(worker_id)
            return
        self._seq[worker_id] = batch.seq
        if batch.kind == "stored":
            self._add(worker_id, batch.block_hashes)
        else:
            self._remove(worker_id, batch.block_hashes)

    def mark_stale(self, worker_id: str) -> None:
        self._clear_confirmed(worker_id)
        self._stale.add(worker_id)

    def needs_resync(self, worker_id: str) -> bool:
        return worker_id in self._stale

    def _add(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        mine = self._confirmed_by_worker.setdefault(worker_id, set())
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self._confirmed.setdefault(h, set()).add(worker_id)
            self._drop_prediction(worker_id, h)  # confirmed now; the prediction's job is done
        if len(mine) > self.max_blocks_per_worker:
            self.mark_stale(worker_id)

    def _remove(self, worker_id: str, hashes: Iterable[bytes]) -> None:
        mine = self._confirmed_by_worker.get(worker_id, set())
        for h in hashes:
            self._drop_prediction(worker_id, h)  # the worker evicted it, whatever we predicted
            if h in mine:
                mine.discard(h)
                self._discard_holder(self._confirmed, h, worker_id)

    def _clear_confirmed(self, worker_id: str) -> None:
        for h in self._confirmed_by_worker.pop(worker_id, ()):
            self._discard_holder(self._confirmed, h, worker_id)

    @staticmethod
    def _discard_holder(table: dict, h: bytes, worker_id: str) -> None:
        """Drop one worker from ``table[h]`` (a set or a worker -> expiry dict); no empty entries stay."""
        holders = table.get(h)
        if holders is None:
            return
        if isinstance(holders, set):
            holders.discard(worker_id)
        else:
            holders.pop(worker_id, None)
        if not holders:
            del table[h]

    # -- predictions ----------------------------------------------------------------------------------

    def predict(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        if self.max_predicted_blocks == 0 or self.predicted_ttl_s == 0:
            return
        now = self.clock()
        expiry = now + self.predicted_ttl_s
        mine = self._predicted_by_worker.setdefault(worker_id, OrderedDict())
        # Deepest block first, so that when the cap bites a chain loses its tail, never its head
        # (a chain without its first block matches nothing). All share one expiry: order stays sorted.
        for h in reversed(hashes):
            mine[h] = expiry
            mine.move_to_end(h)
            self._predicted.setdefault(h, {})[worker_id] = expiry
        # The TTL is constant, so insertion order is expiry order: prune from the old end.
        while mine:
            h, exp = next(iter(mine.items()))
            if exp > now and len(mine) <= self.max_predicted_blocks:
                break
            self._drop_prediction(worker_id, h)

    def _drop_prediction(self, worker_id: str, h: bytes) -> None:
        mine = self._predicted_by_worker.get(worker_id)
        if mine is not None and mine.pop(h, None) is not None:
            self._discard_holder(self._predicted, h, worker_id)

    # -- queries --------------------------------------------------------------------------------------

    def match(self, hashes: Sequence[bytes], worker_ids: Iterable[str]) -> dict[str, int]:
        """For each worker, how many leading ``hashes`` it holds (a chain: the first miss ends it)."""
        now = self.clock()
        result = {w: 0 for w in worker_ids}
        alive = [w for w in result if w not in self._stale]
        for i, h in enumerate(hashes):
            confirmed = self._confirmed.get(h, _NO_HOLDERS)
            predicted = self._predicted.get(h, _NO_PREDICTIONS)
            alive = [w for w in alive if w in confirmed or predicted.get(w, 0.0) > now]
            if not alive:
                break
            for w in alive:
                result[w] = i + 1
        return result

    def num_blocks(self, worker_id: str) -> tuple[int, int]:
        """(confirmed, predicted) block counts of one worker, for metrics."""
        return (len(self._confirmed_by_worker.get(worker_id, ())),
                len(self._predicted_by_worker.get(worker_id, ())))

    def remove_worker(self, worker_id: str) -> None:
        self._clear_confirmed(worker_id)
        for h in list(self._predicted_by_worker.get(worker_id, ())):
            self._drop_prediction(worker_id, h)
        self._predicted_by_worker.pop(worker_id, None)
        self._seq.pop(worker_id, None)
        self._stale.discard(worker_id)


class PrefixHomes:
    """The worker each prefix in use was last placed on, keyed by its first block's hash (its root).

    A prefix keeps its home while requests keep coming: each placement renews it; one idle for
    ``ttl_s`` is forgotten, and at most ``max_roots`` are kept (least recently used dropped first).
    Unlike the cache index, a home outlives the prefix's eviction from that worker's cache: while
    clients use the prefix it belongs to that worker's working set, so when it comes back it goes
    home (one prefill there) instead of landing on another worker and pushing that one's working
    set past its cache, which evicts other prefixes in turn. ``count`` is a worker's number of
    homed prefixes: what a new prefix balances on.
    """

    def __init__(self, ttl_s: float = 600.0, max_roots: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        if max_roots < 0:
            raise ValueError(f"max_roots must be >= 0, got {max_roots}")
        self.ttl_s, self.max_roots, self.clock = ttl_s, max_roots, clock
        self._homes: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # root -> (worker, last use)
        self._counts: dict[str, int] = {}

    def place(self, root: bytes, worker_id: str) -> None:
        """``root``'s prefix was just placed on ``worker_id``: it is its home now, renewed."""
        if self.ttl_s == 0 or self.max_roots == 0:
            return
        self._drop(root)
        self._homes[root] = (worker_id, self.clock())
        self._counts[worker_id] = self._counts.get(worker_id, 0) + 1
        self._expire()

    def home(self, root: bytes) -> str | None:
        self._expire()
        entry = self._homes.get(root)
        return entry[0] if entry is not None else None

    def count(self, worker_id: str) -> int:
        self._expire()
        return self._counts.get(worker_id, 0)

    def remove_worker(self, worker_id: str) -> None:
        for root in [r for r, (w, _) in self._homes.items() if w == worker_id]:
            self._drop(root)
        self._counts.pop(worker_id, None)

    def _drop(self, root: bytes) -> None:
        entry = self._homes.pop(root, None)
        if entry is not None:
            left = self._counts[entry[0]] - 1
            if left:
                self._counts[entry[0]] = left
            else:
                del self._counts[entry[0]]

    def _expire(self) -> None:
        """Renewal moves a root to the end, so the oldest use is always first: prune from there."""
        deadline = self.clock() - self.ttl_s
        while self._homes:
            root, (_, used) = next(iter(self._homes.items()))
            if used > deadline and len(self._homes) <= self.max_roots:
                break
            self._drop(root)
