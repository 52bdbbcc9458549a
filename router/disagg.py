"""Disaggregated prefill/decode: does a prompt's prefill pay off on a prefill worker, and on which one.

A pure planner (no I/O, no clock): the generation flow asks it once per prompt, after the placement
policy has ranked the decode side and predicted how much of the prompt the chosen decode worker has
cached. The rule:

* no healthy prefill worker                        -> straight to decode (``direct_no_prefill_worker``);
* ``prompt_tokens < min_prefill_tokens``           -> straight to decode (``direct_short``): moving the
  KV of a short prompt costs about what computing it does;
* ``prompt_tokens - predicted_cached < min_prefill_tokens`` -> straight to decode (``direct_cached``):
  the decode worker already holds most of it;
* otherwise prefill on the prefill worker with the fewest queued prefill tokens (``disaggregated``).

``min_prefill_tokens == 0`` disaggregates whenever a prefill worker is healthy.

Queued prefill tokens of a prefill worker = prompt tokens this router has in flight in Prefill calls
there (fresh, exact for this router) + ``waiting_tokens`` per request the worker reports waiting
(other routers' traffic, coarse). The sum may count this router's own waiting calls twice; that errs
towards spreading, which is the cheaper mistake for a queue. Ties go to a rendezvous hash of the
prompt's head and the worker id: deterministic, spreads unrelated prompts, and sends prompts with the
same head to the same prefill worker (whose own prefix cache then hits).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from shoal.router.placement import PlacementRequest
from shoal.workers.protocol import WorkerLoad

# Outcomes, one per prompt (the label values of shoal_router_disagg_requests_total).
DISAGGREGATED = "disaggregated"  # the prefill worker returned a KV handle; decode imports it
DIRECT_SHORT = "direct_short"  # the prompt is shorter than min_prefill_tokens
DIRECT_CACHED = "direct_cached"  # the decode worker is predicted to hold all but a few tokens of it
DIRECT_NO_PREFILL_WORKER = "direct_no_prefill_worker"  # prefill workers are known, none is healthy
FALLBACK_PREFILL_FAILED = "fallback_prefill_failed"  # planned, the prefill worker failed: decode computes it
PREFILL_REFUSED = "prefill_refused"  # planned, the prefill worker refused the request (HTTP 400)
CANCELLED = "cancelled"  # planned, the request was cancelled (client gone, deadline) during the prefill
OUTCOMES = (DISAGGREGATED, DIRECT_SHORT, DIRECT_CACHED, DIRECT_NO_PREFILL_WORKER, FALLBACK_PREFILL_FAILED,
            PREFILL_REFUSED, CANCELLED)

DEFAULT_WAITING_TOKENS = 256  # a waiting request on a prefill worker counts as this many queued tokens


@dataclass(frozen=True)
class PrefillView:
    """What the planner sees of one prefill-role worker."""

    worker_id: str
    load: WorkerLoad
    healthy: bool = True
    in_flight_tokens: int = 0  # prompt tokens in this router's open Prefill calls there

    def queued_tokens(self, waiting_tokens: int = DEFAULT_WAITING_TOKENS) -> int:
        return self.in_flight_tokens + waiting_tokens * self.load.num_waiting


@dataclass(frozen=True)
class DisaggPlan:
    """The (prefill, decode) choice for one prompt.

    ``prefill_workers`` is empty when the prompt goes straight to decode, else the healthy prefill
    workers best first (the flow calls the first; on failure decode computes the prefill itself).
    """

    outcome: str
    decode_workers: tuple[str, ...]
    prefill_workers: tuple[str, ...] = ()
    uncached_tokens: int = 0  # prompt tokens the decode worker is predicted to lack

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill_workers)


def plan_disagg(request: PlacementRequest, decode_workers: Sequence[str], predicted_cached: int | None,
                prefill: Sequence[PrefillView], min_prefill_tokens: int,
                waiting_tokens: int = DEFAULT_WAITING_TOKENS) -> DisaggPlan:
    """Decide one prompt's path; ``decode_workers`` are the policy's ranking (best first), and
    ``predicted_cached`` the prompt tokens it expects ``decode_workers[0]`` to hold (None: unknown, 0)."""
    if min_prefill_tokens < 0:
        raise ValueError(f"min_prefill_tokens must be >= 0, got {min_prefill_tokens}")
    if waiting_tokens < 0:
        raise ValueError(f"waiting_tokens must be >= 0, got {waiting_tokens}")
    decode = tuple(decode_workers)
    prompt = len(request.prompt_token_ids)
    uncached = max(prompt - (predicted_cached or 0), 0)
    healthy = [v for v in prefill if v.healthy]
    if not healthy:
        return DisaggPlan(DIRECT_NO_PREFILL_WORKER, decode, (), uncached)
    if prompt < min_prefill_tokens:
        return DisaggPlan(DIRECT_SHORT, decode, (), uncached)
    if uncached < min_prefill_tokens:
        return DisaggPlan(DIRECT_CACHED, decode, (), uncached)
    return DisaggPlan(DISAGGREGATED, decode, rank_prefill(request, healthy, waiting_tokens), uncached)


def rank_prefill(request: PlacementRequest, prefill: Sequence[PrefillView],
                 waiting_tokens: int = DEFAULT_WAITING_TOKENS) -> tuple[str, ...]:
    """Healthy prefill worker ids, fewest queued prefill tokens first (ties: rendezvous hash)."""
    head = request.affinity_key()

    def key(v: PrefillView) -> tuple:
        tie = hashlib.blake2b(head + v.worker_id.encode(), digest_size=8).digest()
        return (v.queued_tokens(waiting_tokens), tie, v.worker_id)

    return tuple(v.worker_id for v in sorted((v for v in prefill if v.healthy), key=key))
