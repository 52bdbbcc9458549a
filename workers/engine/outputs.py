"""Data objects between the engine's layers: scheduler -> model runner -> scheduler -> caller.

All frozen; the model runner keeps its own copy of per-request state, fed by these diffs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen (or must forget and rebuild: resumed after preemption)."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + any tokens generated before a preemption
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: tuple[int, ...]
    num_computed_tokens: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class CachedRequestData:
    request_id: str
    new_block_ids: tuple[int, ...]
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    num_scheduled_tokens: dict[str, int]  # request id -> tokens to compute this step, in batch order
    finished_request_ids: frozenset[str]  # the runner drops their state
    preempted_request_ids: frozenset[str] = frozenset()
    step_id: int = 0  # the scheduler's count of steps; async scheduling pairs outputs with steps by it

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...]  # top-n (token id, logprob), most likely first


@dataclass(frozen=True)
class ModelRunnerOutput:
    """One sampled token per request that reached the end of its known tokens this step."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # structured output: requests whose grammar this token completed (nothing more may follow)
    grammar_finished: frozenset[str] = frozenset()
    # prompt logprobs computed this step: request id -> (prompt index of the first, one per token)
    prompt_logprobs: dict[str, tuple[int, tuple[TokenLogprobs, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None
    num_cached_tokens: int
    # Set on the first output of a request that asked for prompt logprobs: prompt tokens 1.. (token 0 has none)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # vLLM's: one entry per prompt token, None for the first; None when not asked for
    prompt_logprobs: list[TokenLogprobs | None] | None = None
