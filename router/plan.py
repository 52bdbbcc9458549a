"""The placement step: each prompt of a request -> a ``PromptPlan`` (decode workers to try, prefill worker).

Two calls, in this order, for all prompts of one request:

1. :func:`rank_all` ranks every prompt with the pool's policy, and raises the 503 before the policy
   hears of any of them when one finds no worker (placement is all or none).
2. :func:`plan_prompt`, prompt by prompt: tells the policy where the prompt goes (its first-ranked
   worker, whose cache the policy then predicts), counts the placement, and asks the disaggregation
   planner (``disagg.py``) whether the prompt's prefill goes to a prefill worker. Call it for the
   next prompt only after starting this one's Prefill call, so that plan sees this one queued.

No I/O here: the plan is data, the child runner (``child.py``) carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from shoal.router.placement import PlacementRequest

from . import disagg
from .tokenization import Prompt

if TYPE_CHECKING:
    from .context import RouterContext

MAX_ATTEMPTS = 2  # the first-ranked worker, then one retry on the next


@dataclass(frozen=True)
class PromptPlan:
    """Where one prompt's ``n`` children go."""

    prompt_index: int
    placement: PlacementRequest  # what the policy was told (and is told again on a retry)
    workers: tuple[str, ...]  # Generate-serving workers to try in turn, best first (at most MAX_ATTEMPTS)
    predicted_cached: int | None  # prompt tokens the policy expects workers[0] to hold (None: no guess)
    prefill_worker: str | None = None  # disaggregated: compute the prompt's KV there first

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.placement.prompt_token_ids)


def rank_all(ctx: RouterContext, generation_id: str, prompts: Sequence[Prompt],
             session_key: str | None) -> list[tuple[PlacementRequest, list[str]]]:
    """Each prompt with its healthy workers, best first; raises (503) before telling the policy anything."""
    ranked = []
    for p, prompt in enumerate(prompts):
        preq = PlacementRequest(f"{generation_id}-p{p}", prompt.token_ids, session_key=session_key)
        workers = ctx.pool.rank(preq)
        if not workers:
            raise ctx.no_worker_error()
        ranked.append((preq, workers))
    return ranked


def plan_prompt(ctx: RouterContext, prompt_index: int, preq: PlacementRequest, ranked: list[str]) -> PromptPlan:
    """Place one ranked prompt on its first worker and plan its prefill path."""
    predicted = ctx.pool.on_placed(preq, ranked[0])
    ctx.metrics.observe_placement(ranked[0], len(preq.prompt_token_ids), predicted)
    return PromptPlan(prompt_index, preq, tuple(ranked[:MAX_ATTEMPTS]), predicted,
                      _prefill_worker(ctx, preq, ranked, predicted))


def _prefill_worker(ctx: RouterContext, preq: PlacementRequest, ranked: list[str],
                    predicted: int | None) -> str | None:
    """The prefill worker to call first, or None (straight to decode; the outcome is counted here,
    a disaggregated one by the Prefill call when it ends)."""
    views = ctx.pool.prefill_views()
    if not views:  # no prefill pool: nothing to decide, nothing to count
        return None
    plan = disagg.plan_disagg(preq, ranked, predicted, views, ctx.config.disagg_min_prefill_tokens)
    if not plan.disaggregated:
        ctx.metrics.disagg_requests.labels(plan.outcome).inc()
        return None
    return plan.prefill_workers[0]
