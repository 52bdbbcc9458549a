"""``Generation``: all choices of one HTTP request (prompts x n), each a child request streamed from a worker.

A request flows one way through the router, each step in its own module:

    plan.py          placement: every prompt ranked (all or none: 503 if one finds no worker), then
                     placed on its first-ranked worker, with its disaggregated prefill planned
    prefill_call.py  a planned prompt's Prefill call on a prefill worker, shared by its children
    child.py         one child on its plan: retry once before the first token, an error event after,
                     abort on its worker however it ends elsewhere (stop string, cancel, deadline)
    events.py        the one event stream all children feed and the responder reads
    (here)           the fan-out of ``n`` children per prompt, the deadline (504), cancel, metrics

The ``n`` children of a prompt go to its first-ranked worker, which then shares their prefix blocks;
their sampling params come from ``sibling_params`` (seed + i), the engine's own fan-out rule.
``best_of`` (completions) is the same fan-out with more children than are returned: each then also
reports its tokens' logprobs, and :meth:`Generation.final_choices` keeps the ``n`` of each prompt
with the highest cumulative logprob (OpenAI's and vLLM's rule).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from shoal.workers.engine.output_processor import CompletionState, sibling_params
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest

from . import plan
from .child import ChildRunner, PromptGroup
from .choice import Choice, Event
from .context import RouterContext
from .errors import ApiError
from .events import EventStream
from .openai_protocol import PromptTokensDetails, Usage
from .prefill_call import PrefillCall
from .tokenization import Prompt


class Generation:
    """All choices of one HTTP request. :meth:`start` places and starts them; :meth:`next_event` is
    what the responder reads; :meth:`cancel` stops them all (each aborts on its worker)."""

    def __init__(self, ctx: RouterContext, endpoint: str, prompts: list[Prompt], params: SamplingParams, n: int,
                 session_key: str | None, priority: int, request_id: str | None = None,
                 best_of: int | None = None) -> None:
        self.ctx, self.endpoint, self.prompts, self.params, self.n = ctx, endpoint, prompts, params, n
        self.best_of = max(best_of or n, n)  # children per prompt
        self.session_key, self.priority = session_key, priority
        # The prefix of every child's request id (logs, workers); unique per generation.
        self.id = request_id or uuid.uuid4().hex
        self.arrival = ctx.clock()
        self.deadline = self.arrival + ctx.config.request_timeout_s
        self.choices: list[Choice] = []
        self.events = EventStream(ctx, endpoint, self.arrival)
        self._groups: list[PromptGroup] = []
        self._tasks: list[asyncio.Task] = []
        self._finished = False

    @property
    def first_token_at(self) -> float | None:
        return self.events.first_token_at

    # -- the request ----------------------------------------------------------------------------

    def start(self) -> None:
        """Place every prompt (all or none), start its Prefill call if planned, then its ``n`` children."""
        ranked = plan.rank_all(self.ctx, self.id, self.prompts, self.session_key)
        for p, (preq, workers) in enumerate(ranked):
            prompt_plan = plan.plan_prompt(self.ctx, p, preq, workers)  # after the previous prefill started
            siblings = [self._new_choice(p, i, preq.prompt_token_ids) for i in range(self.best_of)]
            prefill = None
            # Prompt logprobs need the prompt computed where it decodes: a prefill worker's blocks would not do.
            if prompt_plan.prefill_worker is not None and self.params.prompt_logprobs is None:
                req = dataclasses.replace(siblings[0].request, request_id=f"{self.id}-p{p}-prefill")
                prefill = PrefillCall(self.ctx, prompt_plan.prefill_worker, req)
            group = PromptGroup(prompt_plan, prefill)
            self._groups.append(group)
            runner = ChildRunner(self.ctx, group, self.events)
            for i, choice in enumerate(siblings):
                self.choices.append(choice)
                self._tasks.append(self.ctx.spawn(runner.run(choice, lead=i == 0)))
        self.events.expect(len(self.choices))

    async def next_event(self) -> Event | None:
        """The next event of any choice; None once all have ended. Past the deadline: cancel, 504."""
        try:
            return await self.events.next(self.deadline)
        except TimeoutError:
            self.cancel()
            raise ApiError(504, f"the request did not finish within request_timeout_s "
                                f"({self.ctx.config.request_timeout_s} s)", code="deadline_exceeded") from None

    def cancel(self) -> None:
        """Stop every child and Prefill call (synchronous: safe in a cancelled scope); each aborts on
        its worker."""
        for group in self._groups:
            if group.prefill is not None:
                group.prefill.cancel()
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def interrupt(self, error: ApiError) -> None:
        """End the request now with ``error`` (the host's drain deadline): the children stop and the
        responder reads ``error`` after what is already queued (a stream: its error event, [DONE])."""
        self.cancel()
        open_choice = next((c for c in self.choices if not c.finished), None)
        if open_choice is not None:
            self.events.end_with(Event(open_choice, finished=True, error=error))

    def finish(self) -> None:
        """Record the request's metrics once, however it ended."""
        if self._finished:
            return
        self._finished = True
        self.cancel()
        self.ctx.metrics.e2e.labels(self.endpoint).observe(self.ctx.clock() - self.arrival)
        self.ctx.metrics.observe_reported_cached(self.cached_tokens())

    def final_choices(self) -> list[tuple[int, Choice]]:
        """(response index, choice) of the choices the answer returns: all of them, or with best_of the
        ``n`` of each prompt with the highest cumulative logprob, best first."""
        if self.best_of == self.n:
            return [(c.index, c) for c in self.choices]
        out = []
        for p in range(len(self.prompts)):
            candidates = [c for c in self.choices if c.prompt_index == p]
            best = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:self.n]
            out += [(p * self.n + j, c) for j, c in enumerate(best)]
        return out

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

    def _new_choice(self, prompt_index: int, sibling: int, prompt_ids: tuple[int, ...]) -> Choice:
        params = sibling_params(self.params, sibling)
        shown = True
        if self.best_of > self.n and params.logprobs is None:  # ranking needs the sampled tokens' logprobs
            params, shown = params.replace(logprobs=0), False
        index = prompt_index * self.best_of + sibling
        req = GenerateRequest(f"{self.id}-{index}", prompt_ids, params, self.priority)
        return Choice(index, prompt_index, req, CompletionState(self.ctx.tok.detokenizer(prompt_ids, params)),
                      show_logprobs=shown)
