"""``PendingStep``: the handle of a step the model runner submitted and has not collected yet.

Everything the step's results need on the host is here: the sampled rows' request states, the
pinned host tensor the sampled ids are being copied into, the event recorded after the step's last
copy, and the logprobs still on their way. ``collect()`` waits for that event (the one host sync of a
step) and turns the step into a ``ModelRunnerOutput``; it is idempotent, so the runner may collect a
step early (a sampler that must see the previous token on the host) and the engine again later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from shoal.workers.engine.outputs import ModelRunnerOutput


@dataclass(eq=False)
class PendingStep:
    states: list  # CachedRequestState of each sampled row, in row order
    ids_host: Any = None  # [len(states)] int64 host tensor (pinned on CUDA) the ids are copied into
    done: Any = None  # CUDA event after the step's last copy; None where the step already ran (CPU)
    logprobs: Any = None  # the sampler's logprobs in flight (host copies queued), or None
    prompt_logprobs: Any = None  # prompt logprobs in flight (prompt_logprobs.launch), or None
    timing: tuple | None = None  # (start, mid, end) CUDA events of the step
    finish: Callable[["PendingStep"], ModelRunnerOutput] | None = None  # the runner's collector
    result: ModelRunnerOutput | None = field(default=None, repr=False)

    @classmethod
    def ready(cls, result: ModelRunnerOutput) -> "PendingStep":
        """A step with nothing in flight (an empty batch)."""
        return cls(states=[], result=result)

    @property
    def collected(self) -> bool:
        return self.result is not None

    def collect(self) -> ModelRunnerOutput:
        if self.result is None:
            self.result = self.finish(self)
        return self.result
