"""Session affinity: a consistent hash ring over ``session_key`` (the OpenAI ``user`` field or an
``X-Session-ID`` header), so a conversation's turns keep landing where its history is cached.

Each worker owns ``virtual_nodes`` points on a 64-bit ring; a key goes to the first point clockwise
of its hash. Removing a worker (or it turning unhealthy) moves only the keys it owned, to the next
workers on the ring; everyone else's sessions stay put. Requests without a key go to least load.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Sequence

from .base import BasePolicy, PlacementRequest, WorkerView, healthy_only, register_policy
from .least_load import LeastLoadPolicy


def _point(key: str) -> int:
    # A stable hash (Python's hash() is salted per process; every router replica must agree).
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """An immutable ring over a fixed set of worker ids."""

    def __init__(self, worker_ids: frozenset[str], virtual_nodes: int):
        points = sorted((_point(f"{wid}#{i}"), wid) for wid in worker_ids for i in range(virtual_nodes))
        self._keys = [p for p, _ in points]
        self._owners = [w for _, w in points]
        self.num_workers = len(worker_ids)

    def walk(self, key: str) -> list[str]:
        """Distinct workers in ring order starting at the key's owner: the owner, then its fallbacks."""
        if not self._keys:
            return []
        start = bisect.bisect_right(self._keys, _point(key))
        out: list[str] = []
        seen: set[str] = set()
        n = len(self._keys)
        for k in range(n):
            owner = self._owners[(start + k) % n]
            if owner not in seen:
                seen.add(owner)
                out.append(owner)
                if len(out) == self.num_workers:
                    break
        return out


@register_policy("session")
class SessionPolicy(BasePolicy):
    def __init__(self, virtual_nodes: int = 128, rng: random.Random | None = None) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self.fallback = LeastLoadPolicy(rng=rng)
        # The ring is rebuilt only when the healthy set changes (a few entries cover flapping).
        self._rings: dict[frozenset[str], HashRing] = {}

    def _ring(self, ids: frozenset[str]) -> HashRing:
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= 8:
                self._rings.pop(next(iter(self._rings)))
            ring = self._rings[ids] = HashRing(ids, self.virtual_nodes)
        return ring

    def choose(self, request: PlacementRequest, workers: Sequence[WorkerView]) -> list[str]:
        if not request.session_key:  # None or "": no session to stick to
            return self.fallback.choose(request, workers)
        ids = frozenset(w.worker_id for w in healthy_only(workers))
        return self._ring(ids).walk(request.session_key)

    def on_worker_removed(self, worker_id: str) -> None:
        self._rings = {ids: r for ids, r in self._rings.items() if worker_id not in ids}
