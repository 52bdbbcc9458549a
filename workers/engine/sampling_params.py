"""What a caller asks of one generation: the vLLM-shaped ``SamplingParams``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .invalid_param import InvalidParam
from .structured_outputs import StructuredOutputs

__all__ = ["InvalidParam", "SamplingParams", "StructuredOutputs"]


def _check(ok: bool, name: str, limit: str, value: object) -> None:
    if not ok:
        reason = f"must be {limit}, got {value!r}"
        raise InvalidParam(name, f"{name} {reason}", reason)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping rules for one request; validated on construction.

    ``temperature == 0`` means greedy. ``top_k <= 0`` (or -1) and ``top_p == 1`` and ``min_p == 0``
    disable those filters. Penalties follow the OpenAI / vLLM definitions: ``presence_penalty`` and
    ``frequency_penalty`` act on generated tokens, ``repetition_penalty`` (CTRL-style, 1 = off) on prompt
    and generated tokens. ``logprobs = k`` returns the sampled token's logprob plus the top ``k``.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # The output must match this constraint (grammar-masked sampling); None = unconstrained. A
    # finished grammar ends the request (finish_reason "stop"), with or without ignore_eos.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        # Accept lists / a single string for convenience; store tuples so the object stays hashable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        _check(self.n >= 1, "n", ">= 1", self.n)
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "-1 (off), 0 (off) or >= 1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})",
                   self.min_tokens)
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", ">= 0", self.logprobs)
        _check(all(s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", "a StructuredOutputs or None", self.structured_outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
