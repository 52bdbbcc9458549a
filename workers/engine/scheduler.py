"""Continuous batching with one token budget per step.

Each step the running requests go first (decodes and unfinished prefill chunks alike), then waiting
ones are admitted while budget, sequence slots and KV blocks last. When a running request cannot get a
block, the lowest-priority running request (the latest under FCFS) is preempted by recompute: its blocks
are freed and it waits again, to recompute its prompt and the tokens it had generated.

With ``async_scheduling`` step N+1 is scheduled while step N runs, before N's sampled tokens are known.
Each request a step will sample gets a *placeholder*: a token counted in
``num_tokens_with_placeholders`` (so the next step schedules its decode) whose id arrives when that
step's output is applied (``update_from_output``, in step order). Stop checks happen there; a token a
step sampled for a request that ended meanwhile (stop, length, abort, a stop string) is discarded.
A request whose in-flight tokens already reach ``max_tokens`` / ``max_model_len`` is not scheduled again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kv_cache_manager import KVCacheManager
from .outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                      SchedulerOutput)
from .request import Request, RequestStatus
from .sampling_params import InvalidParam


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority" (lower Request.priority first, then arrival)
    async_scheduling: bool = False  # schedule the next step before this one's tokens are known

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) or long prompts could never be scheduled")


@dataclass
class SchedulerStats:
    """Counters since start: what ran, what the prefix cache saved, how often the pool overflowed."""

    num_steps: int = 0
    num_computed_tokens: int = 0  # tokens run through the model (prefill, recompute and decode)
    num_prefix_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    num_prefix_hits: int = 0  # of those, tokens found cached (not computed)
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.stats = SchedulerStats()
        self.kv_cache = kv_cache
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()  # to tell the runner next step
        self._next_step_id = 0
        # async: step id -> the requests that step samples (each holds a placeholder for it)
        self._in_flight: dict[int, list[Request]] = {}

    # -- admission ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    @property
    def max_request_tokens(self) -> int:
        """The most tokens one request can ever hold: every block of the KV cache (its pool), or
        ``max_model_len`` if that is less."""
        return min(self.kv_cache.pool.num_blocks * self.kv_cache.block_size, self.config.max_model_len)

    def admission_error(self, num_prompt_tokens: int, max_tokens: int | None) -> InvalidParam | None:
        """Why a request of this size can never run here, or None.

        A request grows to ``min(prompt + max_tokens, max_model_len)`` tokens (max_tokens None: to
        ``max_model_len``) and must hold all of them in the KV cache at once. One that cannot would sit
        at the head of the waiting queue forever (or preempt itself over and over) and hold up every
        request behind it, so it is refused before it is queued, naming the field to change.
        """
        capacity = self.kv_cache.pool.num_blocks * self.kv_cache.block_size
        max_len = self.config.max_model_len
        longest = max_len if max_tokens is None else min(num_prompt_tokens + max_tokens, max_len)
        if longest <= capacity:
            return None
        cache = (f"this worker's KV cache holds at most {capacity} tokens "
                 f"({self.kv_cache.pool.num_blocks} blocks of {self.kv_cache.block_size})")
        if num_prompt_tokens + 1 > capacity:
            return InvalidParam("prompt", f"prompt: {num_prompt_tokens} tokens plus one generated token do not "
                                          f"fit: {cache}")
        room = capacity - num_prompt_tokens
        if max_tokens is None:
            return InvalidParam("max_tokens", f"max_tokens: unset, so the request may grow to max_model_len "
                                              f"({max_len}) tokens, but {cache}; set max_tokens <= {room}")
        return InvalidParam("max_tokens", f"max_tokens: the prompt's {num_prompt_tokens} tokens plus max_tokens "
                                          f"({max_tokens}) need {longest} tokens, but {cache}; max_tokens must "
                                          f"be <= {room} for this prompt")

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """End requests from outside the step (abort, a stop string found by the detokenizer)."""
        done = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(rid)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            done.append(request)
        return done

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Counters from zero again (after the engine's warm-up batches)."""
        self.stats = SchedulerStats()

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()
        held_before: dict[str, int] = {}

        if self.config.policy == "priority":
            # Highest priority first, so the victims popped from the tail are the lowest priority and
            # were not scheduled yet this step (their blocks published now were never computed).
            self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens_with_placeholders - request.num_computed_tokens, budget)
            if n <= 0 or self._ends_in_flight(request):
                i += 1  # nothing to compute, or the tokens in flight already finish it
                continue
            held_before[request.request_id] = self.kv_cache.num_blocks(request.request_id)
            while not self.kv_cache.allocate_slots(request, n):
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted itself; running[i] is now the next request
            num_scheduled[request.request_id] = n
            budget -= n
            i += 1

        # A step that had to preempt admits nobody: the pool is already too tight.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_placeholders:
                break  # preempted with a step in flight: it waits until that step's token is known
            # Cached prompt tokens have no logits: a request that wants prompt logprobs computes them all.
            hits, num_hit = ([], 0) if request.wants_prompt_logprobs else self.kv_cache.get_computed_blocks(request)
            n = request.num_tokens - num_hit
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv_cache.allocate_slots(request, n, hits):
                break
            self.waiting.pop(0)
            if not request.wants_prompt_logprobs:  # looked up in the cache (the hit rate's queries)
                self.stats.num_prefix_queries += request.num_tokens
                self.stats.num_prefix_hits += num_hit
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = n
            budget -= n
            new_reqs.append(NewRequestData(
                request_id=request.request_id, token_ids=tuple(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens, sampling_params=request.sampling_params,
                block_ids=tuple(self.kv_cache.block_ids(request.request_id)),
                num_computed_tokens=num_hit, eos_token_ids=request.eos_token_ids))

        for rid, before in held_before.items():
            if rid in num_scheduled:
                ids = self.kv_cache.block_ids(rid)
                new_ids = tuple(ids[before:]) if len(ids) > before else ()
                cached_reqs.append(CachedRequestData(rid, new_ids, self.requests[rid].num_computed_tokens))
        out = SchedulerOutput(
            new_requests=tuple(new_reqs), cached_requests=tuple(cached_reqs),
            num_scheduled_tokens=num_scheduled, finished_request_ids=frozenset(self._finished_ids),
            preempted_request_ids=frozenset(preempted), step_id=self._next_step_id)
        self._next_step_id += 1
        self._finished_ids.clear()
        self.stats.num_steps += bool(num_scheduled)
        self.stats.num_computed_tokens += out.total_num_scheduled_tokens
        for rid, n in num_scheduled.items():
            self.requests[rid].num_computed_tokens += n
        if self.config.async_scheduling:
            sampling = [r for r in map(self.requests.__getitem__, num_scheduled)
                        if r.num_computed_tokens == r.num_tokens_with_placeholders]
            for request in sampling:
                request.num_placeholders += 1
            self._in_flight[out.step_id] = sampling
        return out

    def update_from_output(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply a step's sampled tokens. Async: call once per scheduled step, in step order."""
        for rid, (first, entries) in result.prompt_logprobs.items():
            request = self.requests.get(rid)
            if request is not None:
                request.add_prompt_logprobs(first, entries)
        if self.config.async_scheduling:
            return self._update_in_flight(sched, result)
        outputs = []
        for rid in sched.num_scheduled_tokens:
            request = self.requests.get(rid)
            token = result.sampled_token_ids.get(rid)
            if request is None or token is None or request.status is not RequestStatus.RUNNING:
                continue  # a prefill chunk that did not reach the end samples nothing
            outputs.append(self._accept(request, token, result))
        return outputs

    def _update_in_flight(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        # The very requests that got this step's placeholders (an id reused meanwhile is another request).
        outputs = []
        for request in self._in_flight.pop(sched.step_id, ()):
            request.num_placeholders -= 1
            token = result.sampled_token_ids.get(request.request_id)
            if token is None or request.status.finished:
                continue  # it ended while this step ran: the token is discarded
            # RUNNING, or PREEMPTED while this step ran: the token is real either way (a sync engine
            # would have had it before preempting), so it is kept and recomputed on resume.
            outputs.append(self._accept(request, token, result))
            if request.status is RequestStatus.RUNNING:
                self.kv_cache.publish_computed(request)  # blocks filled by a placeholder publish now
        return outputs

    def abandon_in_flight(self) -> None:
        """Forget the steps in flight (their execution failed): their placeholders are dropped."""
        for requests in self._in_flight.values():
            for request in requests:
                request.num_placeholders = 0
        self._in_flight.clear()

    # -- internals ------------------------------------------------------------------------------
    def _accept(self, request: Request, token: int, result: ModelRunnerOutput) -> EngineCoreOutput:
        """Append a sampled token, check the stop rules, free the request if it ended."""
        rid = request.request_id
        was = request.status
        request.append_output_token(token)
        self._check_stop(request, token)
        if rid in result.grammar_finished and request.status is not RequestStatus.FINISHED_STOPPED:
            # The grammar is complete: nothing may follow. A stop, even on the last token max_tokens allows.
            request.status = RequestStatus.FINISHED_STOPPED
        lp = result.logprobs.get(rid)
        prompt_lps = request.take_prompt_logprobs()
        done = request.status.finished
        if done:
            (self.running if was is RequestStatus.RUNNING else self.waiting).remove(request)
            self._free(request)
        return EngineCoreOutput(
            request_id=rid, new_token_ids=(token,), new_logprobs=(lp,) if lp else (),
            finish_reason=request.status.value if done else None, stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0), prompt_logprobs=prompt_lps)

    def _ends_in_flight(self, request: Request) -> bool:
        """Its placeholders already reach max_tokens or max_model_len: it finishes when they land."""
        if not request.num_placeholders:
            return False
        max_tokens = request.sampling_params.max_tokens
        return ((max_tokens is not None and len(request.output_token_ids) + request.num_placeholders >= max_tokens)
                or request.num_tokens_with_placeholders >= self.config.max_model_len)

    def _check_stop(self, request: Request, token: int) -> None:
        p = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token in p.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return
        if (p.max_tokens is not None and num_out >= p.max_tokens) or \
                request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def _pick_victim(self) -> Request:
        # running is in schedule order (arrival, or priority after the sort in schedule()):
        # the tail is the least important and has not been given blocks this step.
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._enqueue(request, front=True)

    def _enqueue(self, request: Request, front: bool = False) -> None:
        if self.config.policy == "priority":
            self.waiting.append(request)
            self.waiting.sort(key=Request.sort_key)
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _free(self, request: Request) -> None:
        self.kv_cache.free(request)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]
