"""The child runner: one child ``GenerateRequest`` (one choice) carried out on its prompt's plan.

Its failure rules:

* a worker failing before the child's first token (a 5xx: unreachable, deadline, crashed) moves it
  once to the next-ranked worker; after its first token, or on a refusal (4xx), it ends with an
  error event instead;
* a child that ends anywhere but on its worker (a stop string, a cancel, a deadline, a failure)
  aborts itself there, so its KV blocks are freed;
* a worker leaves placement only when the failure shows it is down (``shows_worker_down``): a bad
  request, a slow first token or a router bug never takes a healthy worker from everyone else;
* disaggregated: sibling 0 waits for the prompt's ``PrefillCall`` and asks its decode worker to
  generate with ``kv_source`` = the returned handle (a handle serves one pull); its siblings start
  once it had its first delta (or ended), without ``kv_source``: the imported blocks are then in the
  decode worker's prefix cache. A failed prefill sends them all to decode as if unplanned.

Every child ends with exactly one finished or error event on the generation's ``EventStream``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from shoal.workers.protocol import TokenDelta

from .choice import Choice, Event
from .errors import ApiError, bad_value
from .events import EventStream
from .plan import PromptPlan
from .prefill_call import PrefillCall
from .worker_pool import WorkerHandle, WorkerUnavailable, aclose_quietly, shows_worker_down

if TYPE_CHECKING:
    from .context import RouterContext

log = logging.getLogger(__name__)

_ABORT_TIMEOUT_S = 2.0  # an abort sent to a dying worker must not hold up the cleanup


@dataclass(eq=False)
class PromptGroup:
    """The ``n`` children of one prompt: its plan, the Prefill call they share, and whether one started."""

    plan: PromptPlan
    prefill: PrefillCall | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # a child had a delta, or ended


class ChildRunner:
    def __init__(self, ctx: RouterContext, group: PromptGroup, events: EventStream) -> None:
        self.ctx, self.group, self.events = ctx, group, events

    async def run(self, choice: Choice, lead: bool) -> None:
        """The child's task (``lead``: sibling 0 of its prompt). It ends with one last event: the
        finished one :meth:`_follow` queued, or an error."""
        try:
            error = await self._await_prefill(choice, lead)
            if error is None:
                error = await self._run_with_retry(choice)
        except Exception as e:  # a bug here must end the choice with an error, never hang the client
            log.exception("request %s failed in the router", choice.request.request_id)
            error = ApiError(500, f"router error: {e}")
        finally:
            self.group.started.set()  # its siblings must never wait for it in vain
        if error is not None:
            self.events.put(Event(choice, finished=True, error=error))

    async def _await_prefill(self, choice: Choice, lead: bool) -> ApiError | None:
        prefill = self.group.prefill
        if prefill is None:
            return None
        try:
            kv = await prefill.handle()
        except ValueError as e:
            return bad_value(e)
        if kv is None:  # the prefill worker failed: decode computes it
            return None
        if lead:
            choice.request = dataclasses.replace(choice.request, kv_source=kv)
        else:
            await self.group.started.wait()
        return None

    async def _run_with_retry(self, choice: Choice) -> ApiError | None:
        """Try the plan's workers in turn while the failure is a worker's (5xx) and no token was sent."""
        workers = self.group.plan.workers
        for attempt, worker_id in enumerate(workers):
            error = await self._attempt(choice, worker_id)
            if error is None:
                return None
            last = attempt == len(workers) - 1
            if choice.num_tokens or last or error.status < 500:
                return error
            log.warning("request %s: %s; retrying on worker %s", choice.request.request_id, error.message,
                        workers[attempt + 1])
            self.ctx.metrics.retries.labels(worker_id).inc()
            self.ctx.pool.policy.on_request_placed(self.group.plan.placement, workers[attempt + 1])
        return self.ctx.no_worker_error()

    async def _attempt(self, choice: Choice, worker_id: str) -> ApiError | None:
        """Stream ``choice`` from one worker; None when it finished, else why it could not."""
        pool = self.ctx.pool
        try:
            handle = pool.handle(worker_id)
        except WorkerUnavailable as e:
            return self.ctx.unavailable(str(e))
        choice.worker_id = worker_id
        pool.acquire(worker_id)
        stream, ended_on_worker = None, False
        try:
            stream = handle.generate(choice.request)
            error, ended_on_worker = await self._follow(choice, worker_id, stream)
            return error
        except ValueError as e:
            if choice.num_tokens:
                raise
            ended_on_worker = True  # refused: it never started there
            return bad_value(e)
        except Exception as e:
            if shows_worker_down(e):
                pool.mark_failed(worker_id, f"{type(e).__name__}: {e}")
            return self.ctx.unavailable(f"worker {worker_id} failed: {e}")
        finally:
            pool.release(worker_id)
            await aclose_quietly(stream, "a worker stream")
            if not ended_on_worker:  # a stop string, a disconnect, a deadline or a failure: free its KV
                await _abort_quietly(handle, choice.request.request_id)

    async def _follow(self, choice: Choice, worker_id: str,
                      stream: AsyncIterator[TokenDelta]) -> tuple[ApiError | None, bool]:
        """Read deltas until ``choice`` finishes: (why it could not, whether it ended on the worker)."""
        rid = choice.request.request_id
        async for delta in stream:
            self.group.started.set()
            if delta.finish_reason in ("error", "abort"):  # we never asked for this abort
                return ApiError(500, f"worker {worker_id} ended request {rid}: "
                                     f"{delta.error or delta.finish_reason}", code="worker_error"), True
            if delta.token_ids:
                self.events.on_tokens(choice, len(delta.token_ids))
            event = choice.fold(delta)
            if event is not None:
                self.events.put(event)
            if choice.finished:
                return None, delta.finish_reason is not None
        return self.ctx.unavailable(f"worker {worker_id} ended the stream of {rid} without a finish reason"), False


async def _abort_quietly(handle: WorkerHandle, request_id: str) -> None:
    try:
        await asyncio.wait_for(handle.abort(request_id), _ABORT_TIMEOUT_S)
    except Exception:  # the worker is gone or slow; its own stream cancellation covers it
        log.debug("abort of %s failed", request_id, exc_info=True)
