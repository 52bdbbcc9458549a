"""``EngineAccess``: the engine-thread protocol the disaggregation roles (``workers/disagg.py``) use.

``AsyncEngine`` offers it. A role never holds the ``LLMEngine`` itself: whatever touches the block
pool or the executor runs on the engine thread through :meth:`call` / :meth:`call_soon`, so the roles
can live on the event loop and on link threads without locks around the cache. Its own module so
that the roles depend on this method set, not on ``AsyncEngine`` (which builds them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .executor.kv_transfer import CacheBlockIO, KVSink
    from .kv_exports import ExportTable
    from .llm_engine import LLMEngine


class EngineAccess(Protocol):
    @property
    def worker_id(self) -> str:
        """The id this worker goes by (a peer logs which decode worker opened a link)."""

    async def call(self, fn: Callable[["LLMEngine"], Any], undo: Callable[[Any], None] | None = None) -> Any:
        """``fn(engine)`` on the engine thread between steps; cancelled after it ran, ``undo(result)``
        runs there instead of the result being handed over."""

    def call_soon(self, fn: Callable[["LLMEngine"], Any]) -> None:
        """Queue ``fn(engine)`` for the engine thread without waiting (from any thread)."""

    @property
    def exports(self) -> "ExportTable":
        """Prompts pinned for a pull; use inside ``call`` (engine thread only)."""

    @property
    def kv_block_io(self) -> "CacheBlockIO":
        """Whole-model block reads and writes (a TP engine's ``TPBlockIO`` has the same interface);
        ``geometry`` and ``device`` are safe from any thread, the data only on the engine thread or
        a sender that holds the blocks pinned."""

    @property
    def kv_sink(self) -> "KVSink":
        """Reserve, fill and publish imported blocks; use inside ``call`` (engine thread only)."""
