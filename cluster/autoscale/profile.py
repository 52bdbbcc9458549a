"""A worker's measured performance: what the ``slo`` policy and the simulator predict capacity from.

Measured by ``shoal bench profile`` on the real engine and stored with the deployment (JSON):

* ``prefill_s[i]``: seconds of one engine step that prefills one prompt of ``prefill_lens[i]`` tokens;
* ``decode_step_s[b][c]``: seconds of one decode step of ``decode_batches[b]`` requests, each with
  ``decode_contexts[c]`` tokens of context;
* ``cold_start_s``: seconds from "start a replica" to "it serves" (engine load, measured).

Between measured points times are interpolated linearly; beyond the last point they are extrapolated
from the last segment (prefill grows with the prompt, a decode step with the batch), never clamped,
so a prediction past the measured range is not optimistic.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extrapolated from the end segments (clamped at 0)."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if xs[0] else 1.0)
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Profile:
    model: str
    device: str
    prefill_lens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_step_s: tuple[tuple[float, ...], ...]  # [batch index][context index]
    cold_start_s: float
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_capacity_tokens: int  # KV cache size of one replica, in tokens
    date: str = ""

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"profile {what}")

        check(len(self.prefill_lens) == len(self.prefill_s) >= 1, "prefill_lens and prefill_s must pair up")
        check(list(self.prefill_lens) == sorted(set(self.prefill_lens)), "prefill_lens must increase")
        check(list(self.decode_batches) == sorted(set(self.decode_batches)), "decode_batches must increase")
        check(list(self.decode_contexts) == sorted(set(self.decode_contexts)), "decode_contexts must increase")
        check(len(self.decode_step_s) == len(self.decode_batches)
              and all(len(row) == len(self.decode_contexts) for row in self.decode_step_s),
              "decode_step_s must be [len(decode_batches)][len(decode_contexts)]")
        check(all(t > 0 for t in self.prefill_s) and all(t > 0 for r in self.decode_step_s for t in r),
              "times must be > 0")
        check(self.cold_start_s >= 0, "cold_start_s must be >= 0")
        check(self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1 and self.kv_capacity_tokens >= 1,
              "limits must be >= 1")
        object.__setattr__(self, "_memo", {})  # (batch, context) -> step time; not a field

    # -- predictions --------------------------------------------------------------------------------

    def prefill_time(self, tokens: float) -> float:
        """Seconds of one step that prefills ``tokens`` prompt tokens (alone)."""
        return _interp(self.prefill_lens, self.prefill_s, tokens)

    def prefill_tokens_per_s(self, prompt_len: float) -> float:
        return prompt_len / self.prefill_time(prompt_len)

    def decode_step_time(self, batch: float, context: float) -> float:
        """Seconds of one decode step of ``batch`` requests with ``context`` tokens each (contexts
        rounded to 16 tokens: a simulator asks millions of times)."""
        key = (batch, round(context / 16) * 16)
        cached = self._memo.get(key)
        if cached is None:
            cached = self._memo[key] = self._decode_uncached(*key)
        return cached

    def _decode_uncached(self, batch: float, context: float) -> float:
        per_ctx = [_interp(self.decode_batches, [row[c] for row in self.decode_step_s], max(batch, 1))
                   for c in range(len(self.decode_contexts))]
        return _interp(self.decode_contexts, per_ctx, context)

    def step_time(self, decode_batch: int, context: float, prefill_tokens: int) -> float:
        """One mixed step: ``decode_batch`` decodes plus a ``prefill_tokens`` chunk. The fixed cost of a
        step (a batch-1 decode's) is paid once, not twice."""
        if prefill_tokens <= 0:
            return self.decode_step_time(decode_batch, context) if decode_batch else 0.0
        prefill = self.prefill_time(prefill_tokens)
        if decode_batch <= 0:
            return prefill
        fixed = min(self.decode_step_time(1, self.decode_contexts[0]), prefill)
        return self.decode_step_time(decode_batch, context) + prefill - fixed

    # -- storage -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        d = dict(d)
        for key in ("prefill_lens", "prefill_s", "decode_batches", "decode_contexts"):
            d[key] = tuple(d[key])
        d["decode_step_s"] = tuple(tuple(row) for row in d["decode_step_s"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """A profile from a JSON file, or by name from the bundled ones (``smollm2-135m-cpu``)."""
        p = Path(path)
        if not p.is_file() and (PROFILES_DIR / f"{path}.json").is_file():
            p = PROFILES_DIR / f"{path}.json"
        if not p.is_file():
            bundled = sorted(f.stem for f in PROFILES_DIR.glob("*.json"))
            raise ValueError(f"profile {str(path)!r} is neither a file nor a bundled profile ({bundled})")
        return cls.from_dict(json.loads(p.read_text()))
