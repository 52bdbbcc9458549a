"""``PrefillCall``: one prompt's Prefill on a prefill worker, started once, awaited by its ``n`` children.

Its result is the ``KVHandle`` (sibling 0 hands it to its decode worker), or None when the prefill
worker failed: the children then go to decode without ``kv_source`` and it computes the prefill itself,
never an error for the client. A refusal (the worker's ``ValueError``) reaches every child, as a 400.

The worker's queued tokens are taken when the call starts (so the next prompt's plan sees them) and
given back however it ends, even cancelled before it ran; the prompt's outcome is counted then too.
Cancelling the call (the generation cancelled: client gone, deadline) aborts it on the prefill worker.
A prefill worker leaves placement only when the failure shows it is down (``shows_worker_down``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from shoal.workers.protocol import GenerateRequest, KVHandle

from . import disagg
from .worker_pool import shows_worker_down

if TYPE_CHECKING:
    from .context import RouterContext

log = logging.getLogger(__name__)


class PrefillCall:
    def __init__(self, ctx: RouterContext, worker_id: str, request: GenerateRequest) -> None:
        self.ctx, self.worker_id, self.request = ctx, worker_id, request
        self._tokens = len(request.prompt_token_ids)
        ctx.pool.acquire_prefill(worker_id, self._tokens)
        self._task = ctx.spawn(self._call())
        self._task.add_done_callback(self._done)

    async def handle(self) -> KVHandle | None:
        """The call's result for one child; raises ``ValueError`` when the worker refused the request."""
        # shield: a child leaving must not cancel the call its siblings wait for (cancel() does that).
        return await asyncio.shield(self._task)

    def cancel(self) -> None:
        if not self._task.done():
            self._task.cancel()

    async def _call(self) -> KVHandle | None:
        pool, metrics, start = self.ctx.pool, self.ctx.metrics, self.ctx.clock()
        try:
            kv = await pool.handle(self.worker_id).prefill(self.request)
        except ValueError:
            raise
        except Exception as e:  # unreachable, deadline, crashed: decode computes the prefill instead
            metrics.prefill_duration.labels("failed").observe(self.ctx.clock() - start)
            if shows_worker_down(e):
                pool.mark_failed(self.worker_id, f"{type(e).__name__}: {e}")
            log.warning("request %s: prefill on worker %s failed (%s); its decode worker computes it",
                        self.request.request_id, self.worker_id, e)
            return None
        metrics.prefill_duration.labels("ok").observe(self.ctx.clock() - start)
        return kv

    def _done(self, task: asyncio.Task) -> None:
        self.ctx.pool.release_prefill(self.worker_id, self._tokens)
        if task.cancelled():
            outcome = disagg.CANCELLED
        elif isinstance(task.exception(), ValueError):  # retrieved here, so never "never retrieved"
            outcome = disagg.PREFILL_REFUSED
        else:
            outcome = disagg.DISAGGREGATED if task.result() is not None else disagg.FALLBACK_PREFILL_FAILED
        self.ctx.metrics.disagg_requests.labels(outcome).inc()
