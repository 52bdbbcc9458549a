"""``RouterConfig``: the limits and knobs of one router replica, validated on construction.

Only the entrypoint (``shoal serve``) reads flags or the environment; everything else receives this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


def _check(ok: bool, name: str, limit: str, value: object) -> None:
    if not ok:
        raise ValueError(f"RouterConfig.{name} must be {limit}, got {value!r}")


@dataclass(frozen=True, eq=False)
class RouterConfig:
    # What /v1/models lists and requests must name. None: the model names the workers report.
    served_model_name: str | None = None
    # Placement: a name from shoal.router.placement.available_policies() and its options
    # (make_pool() passes them to make_policy; block_size must equal the workers').
    placement: str = "prefix_aware"
    placement_options: Mapping[str, object] = field(default_factory=dict)

    # Prompt length limit. None: the smallest max_model_len of the workers, less one generated token.
    max_prompt_tokens: int | None = None
    # Requests generating at once; beyond it up to max_waiting_requests wait (FIFO) for at most
    # queue_timeout_s (then 503); beyond that the router answers 429 at once. n > 1 counts as one.
    max_concurrent_requests: int = 256
    max_waiting_requests: int = 1024
    queue_timeout_s: float = 30.0
    max_body_bytes: int = 8 << 20
    # From arrival to the last token; past it the request is aborted on its worker (504 / error event).
    request_timeout_s: float = 600.0
    retry_after_s: int = 1  # the Retry-After header of 429 and 503 answers

    max_n: int = 16  # completions per request (n; for /v1/completions times the number of prompts)
    max_logprobs: int = 20
    max_stop_sequences: int = 16
    default_completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)

    # Worker pool: how often health and load are polled, and how long one poll may take.
    health_interval_s: float = 1.0
    health_timeout_s: float = 5.0

    # Disaggregated prefill/decode (deployments with prefill-role workers): a prompt goes through a
    # prefill worker when the chosen decode worker is predicted to lack at least this many of its
    # tokens; shorter or mostly cached prompts go straight to decode. 0: always, when one is healthy.
    disagg_min_prefill_tokens: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "placement_options", MappingProxyType(dict(self.placement_options)))
        _check(self.served_model_name is None or bool(self.served_model_name), "served_model_name",
               "a non-empty string or None", self.served_model_name)
        _check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
               ">= 1 or None", self.max_prompt_tokens)
        _check(self.max_concurrent_requests >= 1, "max_concurrent_requests", ">= 1",
               self.max_concurrent_requests)
        _check(self.max_waiting_requests >= 0, "max_waiting_requests", ">= 0", self.max_waiting_requests)
        _check(self.queue_timeout_s > 0, "queue_timeout_s", "> 0", self.queue_timeout_s)
        _check(self.max_body_bytes >= 1024, "max_body_bytes", ">= 1024", self.max_body_bytes)
        _check(self.request_timeout_s > 0, "request_timeout_s", "> 0", self.request_timeout_s)
        _check(self.retry_after_s >= 0, "retry_after_s", ">= 0", self.retry_after_s)
        _check(self.max_n >= 1, "max_n", ">= 1", self.max_n)
        _check(0 <= self.max_logprobs <= 20, "max_logprobs", "in [0, 20] (the engine's limit)",
               self.max_logprobs)
        _check(self.max_stop_sequences >= 0, "max_stop_sequences", ">= 0", self.max_stop_sequences)
        _check(self.default_completion_max_tokens >= 1, "default_completion_max_tokens", ">= 1",
               self.default_completion_max_tokens)
        _check(self.health_interval_s > 0, "health_interval_s", "> 0", self.health_interval_s)
        _check(self.health_timeout_s > 0, "health_timeout_s", "> 0", self.health_timeout_s)
        _check(isinstance(self.disagg_min_prefill_tokens, int) and self.disagg_min_prefill_tokens >= 0,
               "disagg_min_prefill_tokens", "an int >= 0", self.disagg_min_prefill_tokens)
