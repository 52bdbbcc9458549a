"""The workers one router knows: the ``WorkerHandle`` protocol and the ``WorkerPool`` that tracks them.

The pool is the router's only view of the fleet. It

* polls each worker's health and load every ``poll_interval_s`` (time and sleep are injected);
* keeps one KV-event subscription per healthy worker feeding the placement policy, and resubscribes
  (a fresh snapshot) after a ``seq`` gap, a disconnect, a policy asking for resync, or the worker
  turning healthy again (it may have restarted with an empty cache);
* counts this router's in-flight requests per worker (fresher than the load reports), and per
  prefill worker the prompt tokens of this router's open Prefill calls;
* hands the policy ``WorkerView``s in which an unhealthy worker is marked so, which keeps it out of
  placement until a poll finds it healthy again.

Health, without flapping: a worker leaves placement when it *says* it is unhealthy (its engine loop
stopped or is stuck in one step), when a request finds it gone (:func:`shows_worker_down`: it cannot
be reached), or when ``unhealthy_after_misses`` polls in a row go unanswered (a hung process). One
slow or lost health answer (a busy host, a long step holding the GIL) leaves it where it is, and so
does anything a request did wrong (a refusal, a first-token deadline: the request's, not the worker's).

Roles (``WorkerInfo.role``): "unified" and "decode" workers serve Generate and are what the policy
ranks; "prefill" workers only serve Prefill calls, so the policy never sees them (nor their KV
events): the disaggregation planner (``disagg.py``) chooses among them from :meth:`prefill_views`.

Workers join and leave at run time (``add`` / ``remove_worker``): the cluster registry feeds it.
It lives on one event loop: call it from the loop that ran :meth:`start`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Protocol, runtime_checkable

from shoal.router.placement import PlacementPolicy, PlacementRequest, WorkerView, make_policy
from shoal.workers.protocol import GenerateRequest, KVEventBatch, KVHandle, TokenDelta, WorkerInfo, WorkerLoad

from .config import RouterConfig
from .disagg import PrefillView

log = logging.getLogger(__name__)

PREFILL_ROLE = "prefill"
_NO_LOAD = WorkerLoad(num_running=0, num_waiting=0, kv_usage=0.0, num_free_blocks=0, num_total_blocks=0)


class WorkerUnavailable(RuntimeError):
    """The worker cannot take or continue a request (unreachable, shut down): try another one.

    ``started`` says whether the caller already saw part of the stream (then it cannot be retried);
    ``code`` is the transport's status name (gRPC: "UNAVAILABLE", "DEADLINE_EXCEEDED", ...).
    """

    def __init__(self, worker_id: str, message: str, *, code: str = "UNAVAILABLE", started: bool = False):
        super().__init__(f"worker {worker_id}: {message}")
        self.worker_id = worker_id
        self.code = code
        self.started = started


@runtime_checkable
class WorkerHandle(Protocol):
    """One worker as the router sees it, in process (``LocalWorker``) or over gRPC.

    ``generate`` streams the request's deltas; closing the iterator early aborts the request on the
    worker. A ``ValueError`` from it means the request is invalid there (do not retry elsewhere);
    any other exception means the worker failed. ``prefill`` (prefill-role workers) computes the
    prompt's KV, keeps its full blocks pinned for a while and says where they are; the same errors
    apply, and cancelling the call aborts it on the worker.
    """

    worker_id: str

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]: ...

    async def prefill(self, req: GenerateRequest) -> KVHandle: ...

    async def abort(self, request_id: str) -> None: ...

    async def get_load(self) -> WorkerLoad: ...

    async def get_info(self) -> WorkerInfo: ...

    async def get_metrics(self) -> str:
        """The worker's Prometheus series (vLLM's names), as text exposition."""

    async def health(self) -> bool: ...

    def kv_events(self) -> AsyncIterator[KVEventBatch]: ...

    async def close(self) -> None: ...


@dataclass
class WorkerState:
    """The pool's record of one worker (mutated on the pool's loop only)."""

    handle: WorkerHandle
    info: WorkerInfo | None = None
    load: WorkerLoad = _NO_LOAD
    healthy: bool = False
    in_flight: int = 0  # this router's open Generate calls (Prefill calls, on a prefill worker)
    prefill_tokens: int = 0  # prompt tokens of this router's open Prefill calls on it
    num_placed: int = 0  # requests (prompts) this router placed on it (prefills, on a prefill worker)
    last_error: str | None = None
    last_healthy_at: float | None = None
    missed_polls: int = 0  # health polls in a row that got no answer (timeout, transport error)
    kv_batches: int = 0  # KV event batches applied to the policy
    kv_subscriptions: int = 0
    kv_task: asyncio.Task | None = None

    @property
    def worker_id(self) -> str:
        return self.handle.worker_id

    @property
    def role(self) -> str | None:
        """The role the worker reported; None until it first answered."""
        return self.info.role if self.info is not None else None

    @property
    def generates(self) -> bool:
        """Serves Generate calls (unified or decode), so the placement policy may rank it."""
        return self.info is not None and self.info.role != PREFILL_ROLE


class WorkerPool:
    def __init__(self, policy: PlacementPolicy, *, poll_interval_s: float = 1.0,
                 health_timeout_s: float = 5.0, kv_retry_s: float = 0.2, kv_retry_max_s: float = 10.0,
                 unhealthy_after_misses: int = 3, max_open_per_worker: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        if health_timeout_s <= 0:
            raise ValueError(f"health_timeout_s must be > 0, got {health_timeout_s}")
        if unhealthy_after_misses < 1:
            raise ValueError(f"unhealthy_after_misses must be >= 1, got {unhealthy_after_misses}")
        if not 0 < kv_retry_s <= kv_retry_max_s:
            raise ValueError(f"kv_retry_s must be in (0, kv_retry_max_s={kv_retry_max_s}], got {kv_retry_s}")
        if max_open_per_worker < 0:
            raise ValueError(f"max_open_per_worker must be >= 0, got {max_open_per_worker}")
        self.policy = policy
        self.max_open_per_worker = max_open_per_worker
        self.poll_interval_s = poll_interval_s
        self.health_timeout_s = health_timeout_s
        self.unhealthy_after_misses = unhealthy_after_misses
        self.kv_retry_s = kv_retry_s
        self.kv_retry_max_s = kv_retry_max_s
        self.clock = clock
        self._sleep = sleep
        self._workers: dict[str, WorkerState] = {}
        # Removed with a grace: out of placement, their handles open until this router's calls on them end.
        self._leaving: dict[str, WorkerState] = {}
        self._running = False
        self._poll_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # one-off refreshes of workers added while running

    # -- membership -----------------------------------------------------------------------------

    def add(self, handle: WorkerHandle) -> None:
        """Register a worker; it joins placement once a poll finds it healthy (at once if running)."""
        wid = handle.worker_id
        if wid in self._workers:
            raise ValueError(f"worker {wid!r} is already in the pool")
        state = self._workers[wid] = WorkerState(handle)
        if self._running:
            task = asyncio.get_running_loop().create_task(self._refresh(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def add_worker(self, handle: WorkerHandle) -> bool:
        """Register and poll a worker now; returns whether it is healthy (and so placeable)."""
        self.add(handle)
        state = self._workers[handle.worker_id]
        await self._refresh(state)
        return state.healthy

    async def remove_worker(self, worker_id: str, close: bool = True, grace_s: float = 0.0) -> None:
        """Forget a worker (deregistered or dead): out of placement, its KV view dropped.

        ``grace_s`` > 0: this router's calls still open on it keep its handle (a worker drained by a
        scale-down finishes them); it closes when the last one ends, or after ``grace_s`` whatever
        remains. A dead worker's calls fail on their own when its connection breaks."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        await self._stop_kv(state)
        self.policy.on_worker_removed(worker_id)
        if not close:
            return
        if grace_s > 0 and state.in_flight > 0:
            self._leaving[worker_id] = state
            asyncio.get_running_loop().call_later(grace_s, self._close_leaving, worker_id)
            return
        await self._close_handle(state)

    def _close_leaving(self, worker_id: str) -> None:
        state = self._leaving.pop(worker_id, None)
        if state is not None:
            task = asyncio.get_running_loop().create_task(self._close_handle(state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _close_handle(state: WorkerState) -> None:
        try:
            await state.handle.close()
        except Exception:  # closing a dead worker's channel may fail; it is gone either way
            log.debug("closing worker %s failed", state.worker_id, exc_info=True)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll every worker once (so readiness is known when this returns), then keep polling."""
        if self._running:
            return
        self._running = True
        await self.poll_once()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def stop(self) -> None:
        """Stop polling and subscriptions; the workers stay registered (and open)."""
        self._running = False
        tasks = [t for t in (self._poll_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poll_task = None
        for state in self._workers.values():
            await self._stop_kv(state)

    async def close(self) -> None:
        """Stop, then close every worker handle."""
        await self.stop()
        for wid in list(self._workers):
            await self.remove_worker(wid, close=True)
        for state in [self._leaving.pop(wid) for wid in list(self._leaving)]:
            await self._close_handle(state)

    async def _poll_loop(self) -> None:
        while True:
            await self._sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poll must never end the loop
                log.exception("worker poll failed")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._refresh(s) for s in list(self._workers.values())))

    async def _refresh(self, state: WorkerState) -> None:
        handle, timeout = state.handle, self.health_timeout_s
        info, load, error, answered = state.info, state.load, None, True
        try:
            ok = bool(await asyncio.wait_for(handle.health(), timeout))
            if ok:
                if info is None or not state.healthy:  # (re)joining: it may have restarted
                    info = await asyncio.wait_for(handle.get_info(), timeout)
                load = await asyncio.wait_for(handle.get_load(), timeout)
            else:
                detail = getattr(handle, "last_health_error", "")  # GrpcWorkerClient keeps the reason
                error = "health check answered unhealthy" + (f": {detail}" if detail else "")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # no answer: a hung or gone worker, or only a slow one
            ok, answered, error = False, False, f"{type(e).__name__}: {e}"
        if self._workers.get(state.worker_id) is not state:  # removed while we waited
            return
        self._judge(state, ok, answered, info, load, error)

    def _judge(self, state: WorkerState, ok: bool, answered: bool, info: WorkerInfo | None, load: WorkerLoad,
               error: str | None) -> None:
        """Apply one poll's outcome. A healthy worker that did not answer stays healthy (on its last
        load) until ``unhealthy_after_misses`` polls in a row went unanswered: no flapping on one slow
        answer. One that answered "unhealthy" leaves at once."""
        was_healthy = state.healthy
        if not ok and not answered and was_healthy:
            state.missed_polls += 1
            if state.missed_polls < self.unhealthy_after_misses:
                log.info("worker %s missed a health poll (%d in a row): %s", state.worker_id, state.missed_polls,
                         error)
                return
        state.info, state.load, state.healthy = info, load, ok
        if ok:
            state.missed_polls = 0
            state.last_healthy_at = self.clock()
            if not was_healthy:
                log.info("worker %s is healthy", state.worker_id)
                self._check_block_size(state)
                self._restart_kv(state)
        else:
            state.last_error = error
            if was_healthy:
                log.warning("worker %s is unhealthy: %s", state.worker_id, error)

    def _check_block_size(self, state: WorkerState) -> None:
        want = getattr(self.policy, "block_size", None)
        if want is not None and state.info is not None and state.info.block_size != want:
            log.error("worker %s has block_size %d but the %s policy hashes with %d: its prefix "
                      "predictions will miss", state.worker_id, state.info.block_size,
                      getattr(self.policy, "name", "?"), want)

    def mark_failed(self, worker_id: str, error: str) -> None:
        """A request found the worker gone (see :func:`shows_worker_down`): out of placement until a
        poll finds it healthy again."""
        state = self._workers.get(worker_id)
        if state is not None and state.healthy:
            log.warning("worker %s failed a request, taken out of placement: %s", worker_id, error)
            state.healthy, state.last_error = False, error

    # -- KV events ------------------------------------------------------------------------------

    def _restart_kv(self, state: WorkerState) -> None:
        if not self._running:
            return
        if state.kv_task is not None:
            state.kv_task.cancel()
            state.kv_task = None
        if not state.generates:  # the policy never ranks a prefill worker: its KV view is dead weight
            self.policy.on_worker_removed(state.worker_id)
            return
        state.kv_task = asyncio.get_running_loop().create_task(
            self._kv_loop(state), name=f"shoal-kv-{state.worker_id}")

    async def _stop_kv(self, state: WorkerState) -> None:
        task, state.kv_task = state.kv_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _kv_loop(self, state: WorkerState) -> None:
        """Subscribe, apply batches in ``seq`` order; on a gap, end or resync request, subscribe again."""
        wid, delay = state.worker_id, self.kv_retry_s
        needs_resync = getattr(self.policy, "needs_resync", None)
        while True:
            stream = None
            try:
                stream = state.handle.kv_events()
                state.kv_subscriptions += 1
                last_seq: int | None = None
                async for batch in stream:
                    gap = batch.kind != "snapshot" and (last_seq is None or batch.seq != last_seq + 1)
                    # The policy sees the gap too: its index then distrusts this worker until a snapshot.
                    self.policy.on_kv_events(wid, batch)
                    state.kv_batches += 1
                    if gap:
                        log.warning("worker %s: KV event gap (seq %s after %s), resubscribing", wid,
                                    batch.seq, last_seq)
                        break
                    last_seq, delay = batch.seq, self.kv_retry_s
                    if needs_resync is not None and needs_resync(wid):
                        break
                else:
                    log.info("worker %s: KV event stream ended, resubscribing", wid)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("worker %s: KV event subscription failed (%s: %s), retrying in %.1fs", wid,
                         type(e).__name__, e, delay)
            finally:
                await aclose_quietly(stream, "a KV event stream")
            await self._sleep(delay)
            delay = min(delay * 2, self.kv_retry_max_s)

    # -- placement ------------------------------------------------------------------------------

    def views(self) -> list[WorkerView]:
        """What the policy sees: every Generate-serving worker that has ever answered (unhealthy ones
        marked so). Prefill workers are not in it: they never serve a Generate."""
        return [WorkerView(s.worker_id, s.load, s.healthy, s.in_flight)
                for s in self._workers.values() if s.generates]

    def rank(self, request: PlacementRequest) -> list[str]:
        """Healthy Generate-serving worker ids, best first, by the policy (with ``max_open_per_worker``,
        the workers below it first, each group in the policy's order)."""
        healthy = {s.worker_id for s in self._workers.values() if s.healthy and s.generates}
        if not healthy:
            return []
        ranked = [w for w in self.policy.choose(request, self.views()) if w in healthy]
        if self.max_open_per_worker:
            full = {s.worker_id for s in self._workers.values() if not self._below_limit(s)}
            ranked.sort(key=lambda w: w in full)  # stable: the policy's order within each group
        return ranked

    def has_room(self) -> bool:
        """Some healthy Generate-serving worker is below ``max_open_per_worker`` (always, without one)."""
        return any(s.healthy and s.generates and self._below_limit(s) for s in self._workers.values())

    def _below_limit(self, state: WorkerState) -> bool:
        limit = self.max_open_per_worker
        load = state.load
        return not limit or max(state.in_flight, load.num_running + load.num_waiting) < limit

    def prefill_views(self) -> list[PrefillView]:
        """Every prefill-role worker that has ever answered, with this router's queued tokens there
        ([] in a deployment without prefill workers: then nothing is disaggregated)."""
        return [PrefillView(s.worker_id, s.load, s.healthy, s.prefill_tokens)
                for s in self._workers.values() if s.role == PREFILL_ROLE]

    def on_placed(self, request: PlacementRequest, worker_id: str) -> int | None:
        """Tell the policy; returns the prompt tokens it predicts cached there (None: no prediction)."""
        predict = getattr(self.policy, "predicted_cached_tokens", None)
        predicted = predict(request, worker_id) if predict is not None else None
        self.policy.on_request_placed(request, worker_id)
        state = self._workers.get(worker_id)
        if state is not None:
            state.num_placed += 1
        return predicted

    def acquire(self, worker_id: str) -> None:
        state = self._workers.get(worker_id)
        if state is not None:
            state.in_flight += 1

    def release(self, worker_id: str) -> None:
        state = self._workers.get(worker_id) or self._leaving.get(worker_id)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1
            self._left_idle(state)

    def acquire_prefill(self, worker_id: str, prompt_tokens: int) -> None:
        """A Prefill call of ``prompt_tokens`` starts on ``worker_id``: it queues there until released."""
        state = self._workers.get(worker_id)
        if state is not None:
            state.in_flight += 1
            state.prefill_tokens += prompt_tokens
            state.num_placed += 1

    def release_prefill(self, worker_id: str, prompt_tokens: int) -> None:
        state = self._workers.get(worker_id) or self._leaving.get(worker_id)
        if state is not None:
            state.in_flight = max(state.in_flight - 1, 0)
            state.prefill_tokens = max(state.prefill_tokens - prompt_tokens, 0)
            self._left_idle(state)

    def _left_idle(self, state: WorkerState) -> None:
        """A leaving worker's last call ended: close its handle now."""
        if state.in_flight == 0 and state.worker_id in self._leaving:
            self._close_leaving(state.worker_id)

    # -- queries --------------------------------------------------------------------------------

    def handle(self, worker_id: str) -> WorkerHandle:
        state = self._workers.get(worker_id)
        if state is None:
            raise WorkerUnavailable(worker_id, "left the pool")
        return state.handle

    def state(self, worker_id: str) -> WorkerState | None:
        return self._workers.get(worker_id)

    def states(self) -> list[WorkerState]:
        return list(self._workers.values())

    def has_healthy(self) -> bool:
        """Some worker can serve a request (a Generate-serving one: prefill workers alone cannot)."""
        return any(s.healthy and s.generates for s in self._workers.values())

    def max_model_len(self) -> int | None:
        """The smallest max_model_len among known workers: a prompt that fits it fits any of them."""
        lens = [s.info.max_model_len for s in self._workers.values() if s.info is not None]
        return min(lens) if lens else None

    def model_names(self) -> list[str]:
        return sorted({s.info.model for s in self._workers.values() if s.info is not None})

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers


def shows_worker_down(error: BaseException) -> bool:
    """Whether a request's failure shows its worker is down (unreachable, shut down, its engine loop
    stopped), so it should leave placement at once.

    Only ``WorkerUnavailable`` with code UNAVAILABLE does. A refusal (``ValueError``: the request's
    fault), a deadline (DEADLINE_EXCEEDED: a slow answer is not a dead worker), an error the worker
    answered with (INTERNAL, ...) or a bug in the router say nothing about the worker's health: the
    health poll decides those, so one bad request never takes a healthy worker from everyone else.
    """
    return isinstance(error, WorkerUnavailable) and error.code == "UNAVAILABLE"


def make_pool(config: RouterConfig, **pool_options) -> WorkerPool:
    """A pool with the placement policy ``config`` names, polling at ``config.health_interval_s``."""
    policy = make_policy(config.placement, **config.placement_options)
    pool_options.setdefault("poll_interval_s", config.health_interval_s)
    pool_options.setdefault("health_timeout_s", config.health_timeout_s)
    pool_options.setdefault("max_open_per_worker", config.max_open_per_worker)
    return WorkerPool(policy, **pool_options)


async def aclose_quietly(stream, what: str) -> None:
    """Close a handle's stream (``generate``, ``kv_events``) without letting a dead worker's error out."""
    if stream is None:
        return
    closer = getattr(stream, "aclose", None)
    try:
        if closer is not None:
            await closer()
        elif hasattr(stream, "close"):
            stream.close()
    except Exception:
        log.debug("closing %s failed", what, exc_info=True)
