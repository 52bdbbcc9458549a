"""``ExportTable``: the prompts a prefill worker pinned for decode workers to pull, by request id.

Engine thread only (it touches the block pool): the engine thread pins a prefill's blocks the moment
it finishes, before another step could evict them, and expires pins nobody pulled within ``ttl_s``.
``num_pinned_blocks`` and ``num_expired`` are plain counters other threads may read for load reports.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from .executor.kv_transfer import ExportedPrefix, KVSource

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ExportTable:
    """Prompts pinned for a pull, by request id. Engine thread only (it touches the block pool)."""

    def __init__(self, source: KVSource, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.source, self.ttl_s, self._clock = source, ttl_s, clock
        self._pinned: dict[str, tuple[ExportedPrefix, float]] = {}
        self.num_expired = 0
        self.num_pinned_blocks = 0  # kept as a counter: other threads read it for load reports

    def pin(self, request_id: str, prompt_token_ids) -> ExportedPrefix:
        self.release(request_id)  # the same id prefilled again: the newer pin wins
        exported = self.source.pin(prompt_token_ids)
        self._pinned[request_id] = (exported, self._clock() + self.ttl_s)
        self.num_pinned_blocks += len(exported.blocks)
        return exported

    def take(self, request_id: str) -> ExportedPrefix:
        """Hand a pinned prompt over to its sender: out of the table (no TTL any more), still pinned
        until :meth:`release_taken`."""
        entry = self._pinned.pop(request_id, None)
        if entry is None:
            raise KeyError(f"no prefilled prompt {request_id!r} is pinned here (never prefilled, "
                           f"already pulled, or expired after {self.ttl_s:.0f} s)")
        return entry[0]

    def release_taken(self, exported: ExportedPrefix) -> None:
        self.num_pinned_blocks -= len(exported.blocks)
        self.source.release(exported)

    def gather_and_release(self, request_id: str, indices: list[int]) -> "torch.Tensor | None":
        """The asked-for blocks' data (None if none asked), and the pin dropped: the data is a copy."""
        exported = self.take(request_id)
        try:
            return self.source.gather(exported, indices) if indices else None
        finally:
            self.release_taken(exported)

    def release(self, request_id: str) -> bool:
        entry = self._pinned.pop(request_id, None)
        if entry is not None:
            self.release_taken(entry[0])
        return entry is not None

    def expire(self) -> None:
        now = self._clock()
        for rid in [rid for rid, (_, deadline) in self._pinned.items() if deadline <= now]:
            self.release(rid)
            self.num_expired += 1
            log.warning("prefilled prompt %s was not pulled within %.0f s: unpinned", rid, self.ttl_s)

    def release_all(self) -> None:
        for rid in list(self._pinned):
            self.release(rid)

    def __len__(self) -> int:
        return len(self._pinned)
