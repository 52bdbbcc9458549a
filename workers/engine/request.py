"""A request inside the engine: its tokens, its progress, its status. Never crosses a process boundary."""

from __future__ import annotations

import enum
import time
from typing import Sequence

from shoal.workers.protocol import block_hashes

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


class Request:
    """``num_computed_tokens`` catches up with ``num_tokens``; there is no prefill or decode phase."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), priority: int = 0,
                 arrival_time: float | None = None, extra_keys: tuple = ()):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.extra_keys = extra_keys  # mixed into block hashes (LoRA, cache salt)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Async scheduling: tokens that steps still in flight will sample. The scheduler counts them
        # (a placeholder is a token whose id is not known yet); each is replaced by its id on collection.
        self.num_placeholders = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 until then
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        # Prompt logprobs (sampling_params.prompt_logprobs set): those of prompt tokens 1.. as the
        # steps compute them, handed out with the first token; then the params stop asking for them.
        self.prompt_logprobs: list = []
        self._block_hashes: list[bytes] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """Known tokens plus those in flight: what the scheduler brings ``num_computed_tokens`` level with."""
        return len(self.all_token_ids) + self.num_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It still needs its prompt's logits: it must not skip prompt tokens through the prefix cache."""
        return self.sampling_params.prompt_logprobs is not None

    def add_prompt_logprobs(self, first: int, entries) -> None:
        """Logprobs of prompt tokens ``first, first + 1, ...`` (a recomputed step's repeats are dropped)."""
        have = len(self.prompt_logprobs) + 1  # the prompt index of the next one wanted
        if first <= have < first + len(entries):
            self.prompt_logprobs.extend(entries[have - first:])

    def take_prompt_logprobs(self) -> tuple | None:
        """All of them once every prompt token after the first has one, then never again (None)."""
        if not self.wants_prompt_logprobs or len(self.prompt_logprobs) < self.num_prompt_tokens - 1:
            return None
        out = tuple(self.prompt_logprobs)
        self.prompt_logprobs = []
        self.sampling_params = self.sampling_params.replace(prompt_logprobs=None)
        return out

    def block_hashes(self, block_size: int) -> list[bytes]:
        """Hashes of this request's full blocks of known tokens (never a placeholder), extended
        incrementally as tokens arrive."""
        have = len(self._block_hashes)
        if (have + 1) * block_size <= self.num_tokens:
            parent = self._block_hashes[-1] if have else None
            self._block_hashes += block_hashes(self.all_token_ids, block_size, self.extra_keys,
                                               start=have, parent=parent)
        return self._block_hashes

    def sort_key(self) -> tuple:
        """Lower sorts first: scheduled earlier, preempted later."""
        return (self.priority, self.arrival_time)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
