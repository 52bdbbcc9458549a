"""A pool's :class:`PoolObservation` from its workers' load reports, sampled over time (pure; no I/O).

Each sample is ``worker id -> (WorkerLoad, WorkerTotals)`` at one moment. Queue and KV figures are the
newest sample's; rates are differences of the counters over the last ``window_s``:

* arrivals = finished + the change in requests present (running + waiting), per worker: a request
  that arrived either finished or is still there, so this counts each arrival once, without the
  router's help; ``recent_arrival_rate`` is the same between the last two samples alone;
* the request mix is the finished requests' mean prompt and output lengths;
* tokens/s is the prompt and generated tokens computed;
* the longest queue time is the newest sample's oldest waiting request, over all workers.

A worker counts from its first sample in the window (one that joined mid-window loses at most what
arrived before its first report); one that left takes its counts with it (a drained worker gets no
new arrivals, so the rate dips for at most one window after a scale-down).
"""

from __future__ import annotations

from collections import deque
from typing import Mapping

from shoal.workers.protocol import WorkerLoad, WorkerTotals

from .base import PoolObservation

Loads = Mapping[str, tuple[WorkerLoad, WorkerTotals]]


class LoadWindow:
    """The samples of one pool within ``window_s`` seconds -> an observation."""

    def __init__(self, window_s: float = 30.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 (seconds of load history rates are taken over), got {window_s}")
        self.window_s = window_s
        self.samples: deque[tuple[float, Loads]] = deque()

    def add(self, now: float, loads: Loads) -> None:
        self.samples.append((now, dict(loads)))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()  # keep one sample at or before the window's start: the base

    def observation(self, pool: str, now: float, ready: int, starting: int) -> PoolObservation:
        """The pool at ``now`` (after :meth:`add` of this moment's loads)."""
        if not self.samples:
            return PoolObservation(now=now, pool=pool, ready_replicas=ready, starting_replicas=starting)
        t_new, newest = self.samples[-1]
        span = t_new - self.samples[0][0]
        arrived = finished = prompt = output = computed = 0
        for wid, (load, totals) in newest.items():
            base = next((s[wid] for _, s in self.samples if wid in s), None)
            if base is None or base is newest[wid]:
                continue
            old_load, old = base
            finished += totals.num_finished - old.num_finished
            arrived += arrivals_between(base, (load, totals))
            prompt += totals.prompt_tokens - old.prompt_tokens
            output += totals.output_tokens - old.output_tokens
            computed += totals.computed_tokens - old.computed_tokens
        recent = 0.0
        if len(self.samples) >= 2:
            t_prev, previous = self.samples[-2]
            count = sum(arrivals_between(previous[wid], now_) for wid, now_ in newest.items() if wid in previous)
            recent = max(0, count) / (t_new - t_prev) if t_new > t_prev else 0.0
        loads = [load for load, _ in newest.values()]
        oldest = max((totals.oldest_wait_s for _, totals in newest.values()), default=0.0)
        return PoolObservation(
            now=now, pool=pool, ready_replicas=ready, starting_replicas=starting,
            num_running=sum(x.num_running for x in loads), num_waiting=sum(x.num_waiting for x in loads),
            kv_usage=sum(x.kv_usage for x in loads) / len(loads) if loads else 0.0,
            tokens_per_s=computed / span if span > 0 else 0.0,
            arrival_rate=max(0, arrived) / span if span > 0 else 0.0, recent_arrival_rate=recent,
            mean_prompt_len=prompt / finished if finished > 0 else 0.0,
            mean_output_len=output / finished if finished > 0 else 0.0, max_queue_time_s=oldest)


def arrivals_between(old: tuple[WorkerLoad, WorkerTotals], new: tuple[WorkerLoad, WorkerTotals]) -> int:
    """Requests that reached one worker between two of its reports: finished + the change in present."""
    (old_load, old_totals), (load, totals) = old, new
    return (totals.num_finished - old_totals.num_finished
            + (load.num_running + load.num_waiting) - (old_load.num_running + old_load.num_waiting))
