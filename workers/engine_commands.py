"""What callers hand the engine thread, and what it hands back besides ``TokenDelta``s.

Commands go into one thread-safe queue and are applied at the top of an engine loop turn, in order,
so an abort takes effect within one step. Each is a frozen, slotted dataclass; the queues and the
``Reply`` they carry are the only mutable parts, and those are thread-safe by construction.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .aio import LoopQueue, settle
from .protocol import GenerateRequest

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddRequest:
    """Run ``request``; its deltas go to ``stream``. ``export``: a prefill for another worker, whose
    full prompt blocks are pinned the moment it finishes (the stream then ends with ``Exported``)."""

    request: GenerateRequest
    stream: LoopQueue
    export: bool = False


@dataclass(frozen=True, slots=True)
class Abort:
    """End the request (unknown ids are ignored); its stream gets a last ``abort`` delta."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Send ``stream`` a snapshot of the prefix cache, then every KV event batch after it."""

    stream: LoopQueue


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    stream: LoopQueue


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: wakes an idle loop so it sees a stop at once."""


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(engine)`` on the engine thread between steps. ``reply``: where the result goes
    (None: nobody waits, a failure is logged)."""

    fn: Callable[["LLMEngine"], Any]
    reply: "Reply | None" = None

    def run(self, engine: "LLMEngine") -> None:
        try:
            result, error = self.fn(engine), None
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            result, error = None, e
        if self.reply is not None:
            self.reply.deliver(result, error)
        elif error is not None:
            log.error("engine-thread call failed: %r", error)


Command = AddRequest | Abort | Subscribe | Unsubscribe | Wake | Call


class Reply:
    """The future a ``Call``'s caller awaits. Either the caller abandons it first (then the engine
    thread runs ``undo`` on the result itself) or the engine thread delivers first (then the
    abandoning caller must queue ``undo``): never both, never neither."""

    __slots__ = ("loop", "future", "undo", "_lock", "_done", "_abandoned", "result", "error")

    def __init__(self, undo: Callable[[Any], None] | None = None):
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future = self.loop.create_future()
        self.undo = undo
        self._lock = threading.Lock()
        self._done = self._abandoned = False
        self.result: Any = None
        self.error: BaseException | None = None

    def deliver(self, result: Any, error: BaseException | None) -> None:
        """Engine thread: hand the outcome over, or undo it if the caller already left."""
        with self._lock:
            self._done, self.result, self.error = True, result, error
            abandoned = self._abandoned
        if not abandoned:
            self.loop.call_soon_threadsafe(settle, self.future, result, error)
        elif error is None and self.undo is not None:
            self.undo(result)

    def abandon(self) -> bool:
        """The caller leaves. True if the engine thread already produced a result the caller must undo."""
        with self._lock:
            self._abandoned = True
            return self._done and self.error is None


@dataclass(frozen=True, slots=True)
class Exported:
    """The last item of an ``export`` request's stream: its prompt's full blocks, pinned for a pull."""

    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
