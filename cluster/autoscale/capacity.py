"""How many requests per second one replica serves inside its SLO, predicted from a :class:`Profile`.

* **prefill** replica: a single server whose service time is the prompt's prefill step; the TTFT
  quantile is the M/M/1 waiting-time quantile plus the service (M/M/1 is the pessimistic side of the
  real, nearly deterministic service: no optimism from the queueing estimate);
* **decode** replica: the largest batch whose step time keeps ITL inside its target; by Little's law
  it serves ``batch / (output_len * step)`` requests per second;
* **unified** replica: both on one engine. Prefill takes a fraction ``f = rate * prefill_time`` of the
  time, which stretches every decode step by ``1 / (1 - f)``; the batch follows from Little's law at
  that stretched ITL (a fixed point), and a prompt waits for the steps in front of it.

Every rate is a bisection on the rate that keeps the predicted figures inside the SLO; ``utilization``
(< 1) is applied by the policy, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .profile import Profile

INFEASIBLE = 0.0


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    itl_s: float
    quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.itl_s <= 0 or not 0 < self.quantile < 1:
            raise ValueError(f"SLO targets must be > 0 and the quantile in (0, 1), got {self}")


@dataclass(frozen=True)
class Mix:
    """The request mix a pool sees: mean prompt and output lengths in tokens."""

    prompt_len: float
    output_len: float


def mm1_wait_quantile(rate: float, service_s: float, q: float) -> float:
    """The ``q`` quantile of the waiting time of an M/M/1 queue (``inf`` when it is unstable)."""
    rho = rate * service_s
    if rho >= 1:
        return math.inf
    if rho <= 1 - q:
        return 0.0  # P(wait > 0) = rho: the quantile falls among those that do not wait
    return math.log(rho / (1 - q)) * service_s / (1 - rho)


class CapacityModel:
    def __init__(self, profile: Profile, slo: Slo) -> None:
        self.profile, self.slo = profile, slo

    # -- per role ---------------------------------------------------------------------------------

    def prefill_service_s(self, mix: Mix) -> float:
        p = self.profile
        chunks = max(1, math.ceil(mix.prompt_len / p.max_num_batched_tokens))
        return chunks * p.prefill_time(min(mix.prompt_len, p.max_num_batched_tokens))

    def prefill_ttft(self, rate: float, mix: Mix) -> float:
        s = self.prefill_service_s(mix)
        return mm1_wait_quantile(rate, s, self.slo.quantile) + s

    def max_decode_batch(self, mix: Mix) -> int:
        """The largest batch whose decode step keeps ITL inside the target (0: not even one request)."""
        p = self.profile
        context = mix.prompt_len + mix.output_len / 2
        limit = min(p.max_num_seqs, max(1, int(p.kv_capacity_tokens // max(1.0, mix.prompt_len + mix.output_len))))
        best = 0
        for batch in range(1, limit + 1):
            if p.decode_step_time(batch, context) > self.slo.itl_s:
                break
            best = batch
        return best

    def decode_rate(self, mix: Mix) -> float:
        batch = self.max_decode_batch(mix)
        if batch == 0:
            return INFEASIBLE
        step = self.profile.decode_step_time(batch, mix.prompt_len + mix.output_len / 2)
        return batch / (mix.output_len * step)

    def prefill_rate(self, mix: Mix) -> float:
        return self._bisect(lambda r: self.prefill_ttft(r, mix) <= self.slo.ttft_s,
                            1.0 / self.prefill_service_s(mix))

    def unified_figures(self, rate: float, mix: Mix) -> tuple[float, float, float]:
        """(TTFT quantile, ITL, batch) of one unified replica at ``rate`` requests/s."""
        p = self.profile
        context = mix.prompt_len + mix.output_len / 2
        busy = rate * self.prefill_service_s(mix)  # fraction of time spent prefilling
        if busy >= 1:
            return math.inf, math.inf, math.inf
        itl, batch = p.decode_step_time(1, context), 1.0
        for _ in range(60):  # Little: batch = rate * output_len * itl; itl = step(batch) / (1 - busy)
            batch = max(1.0, rate * mix.output_len * itl)
            if batch > p.max_num_seqs:
                return math.inf, math.inf, batch
            itl = p.decode_step_time(batch, context) / (1 - busy)
        step = p.decode_step_time(batch, context)
        ttft = mm1_wait_quantile(rate, self.prefill_service_s(mix) + step, self.slo.quantile)
        return ttft + self.prefill_service_s(mix) + step, itl, batch

    def unified_rate(self, mix: Mix) -> float:
        def ok(r: float) -> bool:
            ttft, itl, _ = self.unified_figures(r, mix)
            return ttft <= self.slo.ttft_s and itl <= self.slo.itl_s

        return self._bisect(ok, 1.0 / self.prefill_service_s(mix))

    def rate(self, role: str, mix: Mix) -> float:
        """Requests/s one replica of ``role`` serves inside the SLO."""
        return {"prefill": self.prefill_rate, "decode": self.decode_rate, "unified": self.unified_rate}[role](mix)

    @staticmethod
    def _bisect(ok, high: float) -> float:
        low = 0.0
        if not ok(1e-9):
            return INFEASIBLE
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if ok(mid) else (low, mid)
        return low
