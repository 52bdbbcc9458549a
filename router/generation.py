"""``Generation``: all choices of one HTTP request, each a child request streamed from a worker.

Placement is all or none: every prompt is ranked before any child starts (503 if one finds no
worker). The ``n`` children of a prompt go to its first-ranked worker, which then shares their prefix
blocks. A child whose worker fails before its first token moves once to the next-ranked worker; after
its first token, or on a refusal (4xx), it ends with an error event instead.

A child that ends anywhere but on its worker (a stop string, a cancel, a deadline, a failure) aborts
itself there, so its KV blocks are freed.

Disaggregated serving (a pool with prefill-role workers): after placing a prompt on its decode worker,
the planner (``disagg.py``) says whether its prefill goes to a prefill worker. If so, one Prefill call
per prompt (request id ``<generation>-p<prompt>-prefill``, otherwise sibling 0's request) runs as a
task its ``n`` children await. Sibling 0 then asks its decode worker to generate with ``kv_source`` =
the returned handle (the decode worker pulls the blocks it lacks, which unpins them on the prefill
worker: a handle serves one pull). Its siblings start once it has its first delta (or ended), without
``kv_source``: by then the imported blocks are in the decode worker's prefix cache. A prefill worker that
fails is taken out of placement and its children go to decode without ``kv_source`` (it computes the
prefill itself): never an error for the client. A refusal is a 400, as from a decode worker. Cancelling
the generation cancels the Prefill call, which aborts it on the prefill worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import AsyncIterator

from shoal.router.placement import PlacementRequest
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest, KVHandle, TokenDelta

from . import disagg
from .choice import Choice, Event
from .context import RouterContext
from .errors import ApiError, bad_value
from .openai_protocol import PromptTokensDetails, Usage
from .tokenization import Prompt
from .worker_pool import WorkerHandle, WorkerUnavailable, aclose_quietly

log = logging.getLogger(__name__)

_ABORT_TIMEOUT_S = 2.0  # an abort sent to a dying worker must not hold up the cleanup
_MAX_ATTEMPTS = 2  # the first-ranked worker, then one retry on the next


class Generation:
    """All choices of one HTTP request (prompts x n), each a child request streamed from a worker.

    Children run as tasks and put ``Event``s on one queue; every child ends with exactly one event
    that is ``finished`` or carries an ``error``. :meth:`cancel` stops them all, and each aborts its
    request on its worker on the way out.
    """

    def __init__(self, ctx: RouterContext, endpoint: str, prompts: list[Prompt], params: SamplingParams, n: int,
                 session_key: str | None, priority: int) -> None:
        self.ctx, self.endpoint, self.prompts, self.params, self.n = ctx, endpoint, prompts, params, n
        self.session_key, self.priority = session_key, priority
        self.id = uuid.uuid4().hex
        self.arrival = ctx.clock()
        self.deadline = self.arrival + ctx.config.request_timeout_s
        self.choices: list[Choice] = []
        self.first_token_at: float | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._placements: list[PlacementRequest] = []  # per prompt: what the policy is told on a retry
        self._prefills: list[asyncio.Task] = []  # Prefill calls (at most one per prompt)
        self._started: list[asyncio.Event] = []  # per prompt: a choice of it had a delta, or ended
        self._open = 0
        self._finished = False

    # -- the request ----------------------------------------------------------------------------

    def start(self) -> None:
        """Place every prompt (all or none: 503 if any finds no worker), then start the children."""
        placed = self._place()
        self._placements = [preq for preq, _ in placed]
        for p, (preq, ranked) in enumerate(placed):
            predicted = self.ctx.pool.on_placed(preq, ranked[0])
            self.ctx.metrics.observe_placement(ranked[0], len(preq.prompt_token_ids), predicted)
            siblings = [self._new_choice(p, i, preq.prompt_token_ids) for i in range(self.n)]
            prefill = self._start_prefill(p, preq, ranked, predicted, siblings[0].request)
            self._started.append(asyncio.Event())
            for choice in siblings:
                self.choices.append(choice)
                self._tasks.append(self.ctx.spawn(self._run(choice, ranked[:_MAX_ATTEMPTS], prefill)))
        self._open = len(self.choices)

    async def next_event(self) -> Event | None:
        """The next event of any choice; None once all have ended. Past the deadline: cancel, 504."""
        if self._open == 0:
            return None
        remaining = self.deadline - self.ctx.clock()
        try:
            # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that races an event already
            # taken off the queue, and a client's disconnect then leaves its request running.
            async with asyncio.timeout(max(remaining, 0.0)):
                event = await self._queue.get()
        except TimeoutError:
            self.cancel()
            raise ApiError(504, f"the request did not finish within request_timeout_s "
                                f"({self.ctx.config.request_timeout_s} s)", code="deadline_exceeded") from None
        if event.finished or event.error is not None:
            self._open -= 1
        return event

    def cancel(self) -> None:
        """Stop every child and Prefill call (synchronous: safe in a cancelled scope); each aborts on
        its worker."""
        for task in (*self._prefills, *self._tasks):
            if not task.done():
                task.cancel()

    def finish(self) -> None:
        """Record the request's metrics once, however it ended."""
        if self._finished:
            return
        self._finished = True
        self.cancel()
        self.ctx.metrics.e2e.labels(self.endpoint).observe(self.ctx.clock() - self.arrival)
        self.ctx.metrics.observe_reported_cached(self.cached_tokens())

    def cached_tokens(self) -> int:
        """Per prompt, the most cached tokens any of its choices reported (siblings share a prefix)."""
        best: dict[int, int] = {}
        for c in self.choices:
            best[c.prompt_index] = max(best.get(c.prompt_index, 0), c.num_cached_tokens)
        return sum(best.values())

    def usage(self) -> Usage:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens()))

    def _place(self) -> list[tuple[PlacementRequest, list[str]]]:
        """Each prompt with its healthy workers, best first; raises before telling the policy anything."""
        placed = []
        for p, prompt in enumerate(self.prompts):
            preq = PlacementRequest(f"{self.id}-p{p}", prompt.token_ids, session_key=self.session_key)
            ranked = self.ctx.pool.rank(preq)
            if not ranked:
                raise self.ctx.no_worker_error()
            placed.append((preq, ranked))
        return placed

    def _new_choice(self, prompt_index: int, sibling: int, prompt_ids: tuple[int, ...]) -> Choice:
        # Siblings must not draw the same random numbers: seed + i, like vLLM.
        params = self.params if self.params.seed is None else self.params.replace(seed=self.params.seed + sibling)
        index = prompt_index * self.n + sibling
        req = GenerateRequest(f"{self.id}-{index}", prompt_ids, params, self.priority)
        return Choice(index, prompt_index, req, self.ctx.tok.detokenizer(prompt_ids, params))

    # -- disaggregated prefill -------------------------------------------------------------------

    def _start_prefill(self, prompt_index: int, preq: PlacementRequest, decode: list[str], predicted: int | None,
                       first: GenerateRequest) -> asyncio.Task | None:
        """Plan the prompt's prefill path; when it goes through a prefill worker, start that call.

        The task's result is the ``KVHandle``, or None when the prefill worker failed; it raises
        ``ValueError`` when the worker refused the request. Its done callback (which runs however the
        task ends, even cancelled before it started) releases the worker's queued tokens and counts
        the prompt's outcome.
        """
        pool, metrics = self.ctx.pool, self.ctx.metrics
        views = pool.prefill_views()
        if not views:  # no prefill pool: nothing to decide, nothing to count
            return None
        plan = disagg.plan_disagg(preq, decode, predicted, views, self.ctx.config.disagg_min_prefill_tokens)
        if not plan.disaggregated:
            metrics.disagg_requests.labels(plan.outcome).inc()
            return None
        worker_id, tokens = plan.prefill_workers[0], len(preq.prompt_token_ids)
        req = dataclasses.replace(first, request_id=f"{self.id}-p{prompt_index}-prefill")
        pool.acquire_prefill(worker_id, tokens)  # now, so the next prompt's plan sees this one queued
        task = self.ctx.spawn(self._prefill(worker_id, req))

        def done(t: asyncio.Task) -> None:
            pool.release_prefill(worker_id, tokens)
            if t.cancelled():
                outcome = disagg.CANCELLED
            elif isinstance(t.exception(), ValueError):  # retrieved here, so never "never retrieved"
                outcome = disagg.PREFILL_REFUSED
            else:
                outcome = disagg.DISAGGREGATED if t.result() is not None else disagg.FALLBACK_PREFILL_FAILED
            metrics.disagg_requests.labels(outcome).inc()

        task.add_done_callback(done)
        self._prefills.append(task)
        return task

    async def _prefill(self, worker_id: str, req: GenerateRequest) -> KVHandle | None:
        """One Prefill call: the handle; None when the worker failed (it leaves placement); a refusal
        (``ValueError``) passes through."""
        pool, metrics = self.ctx.pool, self.ctx.metrics
        start = self.ctx.clock()
        try:
            kv = await pool.handle(worker_id).prefill(req)
        except ValueError:
            raise
        except Exception as e:  # unreachable, deadline, crashed: decode computes the prefill instead
            metrics.prefill_duration.labels("failed").observe(self.ctx.clock() - start)
            pool.mark_failed(worker_id, f"{type(e).__name__}: {e}")
            log.warning("request %s: prefill on worker %s failed (%s); its decode worker computes it",
                        req.request_id, worker_id, e)
            return None
        metrics.prefill_duration.labels("ok").observe(self.ctx.clock() - start)
        return kv

    async def _await_prefill(self, choice: Choice, prefill: asyncio.Task | None) -> ApiError | None:
        """Wait for the prompt's prefill; sibling 0 takes the KV handle into its request, the others
        wait for it to start (see the module docstring). No-op without a prefill or when it failed."""
        if prefill is None:
            return None
        try:
            # shield: a sibling leaving must not cancel the call the others wait for (cancel() does).
            kv = await asyncio.shield(prefill)
        except ValueError as e:
            return bad_value(e)
        if kv is None:
            return None
        if choice.index % self.n == 0:
            choice.request = dataclasses.replace(choice.request, kv_source=kv)
        else:
            await self._started[choice.prompt_index].wait()
        return None

    # -- one child ------------------------------------------------------------------------------

    async def _run(self, choice: Choice, workers: list[str], prefill: asyncio.Task | None = None) -> None:
        """The child's task. It ends with one last event: the finished one :meth:`_apply` queued, or an error."""
        try:
            error = await self._await_prefill(choice, prefill)
            if error is None:
                error = await self._run_with_retry(choice, workers)
        except Exception as e:  # a bug here must end the choice with an error, never hang the client
            log.exception("request %s failed in the router", choice.request.request_id)
            error = ApiError(500, f"router error: {e}")
        finally:
            self._started[choice.prompt_index].set()  # its siblings must never wait for it in vain
        if error is not None:
            self._queue.put_nowait(Event(choice, finished=True, error=error))

    async def _run_with_retry(self, choice: Choice, workers: list[str]) -> ApiError | None:
        """Try ``workers`` in turn while the failure is a worker's (5xx) and no token has been sent."""
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
            self.ctx.pool.policy.on_request_placed(self._placements[choice.prompt_index], workers[attempt + 1])
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
            self._started[choice.prompt_index].set()
            if delta.finish_reason in ("error", "abort"):  # we never asked for this abort
                return ApiError(500, f"worker {worker_id} ended request {rid}: "
                                     f"{delta.error or delta.finish_reason}", code="worker_error"), True
            if self._apply(choice, delta):
                return None, delta.finish_reason is not None
        return self.ctx.unavailable(f"worker {worker_id} ended the stream of {rid} without a finish reason"), False

    def _apply(self, choice: Choice, delta: TokenDelta) -> bool:
        """Fold one delta into ``choice``; queue what the client should see. True when it finished."""
        if delta.token_ids:
            self._observe_tokens(choice, len(delta.token_ids))
        event = choice.fold(delta)
        if event is not None:
            self._queue.put_nowait(event)
        return choice.finished

    def _observe_tokens(self, choice: Choice, count: int) -> None:
        """Time to first token (of the request) and gaps between one choice's deltas."""
        now, metrics = self.ctx.clock(), self.ctx.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.labels(self.endpoint).observe(now - self.arrival)
        elif choice.last_token_at is not None:
            metrics.inter_token.labels(self.endpoint).observe(now - choice.last_token_at)
        choice.last_token_at = now
        metrics.generation_tokens.inc(count)


async def _abort_quietly(handle: WorkerHandle, request_id: str) -> None:
    try:
        await asyncio.wait_for(handle.abort(request_id), _ABORT_TIMEOUT_S)
    except Exception:  # the worker is gone or slow; its own stream cancellation covers it
        log.debug("abort of %s failed", request_id, exc_info=True)
