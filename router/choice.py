"""One choice of a request: a child request's state as its worker's deltas arrive.

The router, not the worker, detokenizes and applies stop strings, so the text a client sees never
holds a stop string (nor half of one still arriving): :meth:`Choice.fold` turns each ``TokenDelta``
into the ``Event`` the client should see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.workers.engine.output_processor import CompletionState
from shoal.workers.protocol import GenerateRequest, TokenDelta, TokenLogprob

from .errors import ApiError


@dataclass(eq=False)
class Choice:
    """One child's state; the stop-string and finish rule is ``CompletionState``'s (the engine's own)."""

    index: int  # in the response: prompt_index * n + sibling
    prompt_index: int
    request: GenerateRequest
    completion: CompletionState
    text: str = ""  # emitted so far (stop strings never in it)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0
    last_token_at: float | None = None
    worker_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.completion.finished

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.completion.stop_reason

    @property
    def num_tokens(self) -> int:
        return self.completion.num_tokens

    @property
    def wants_logprobs(self) -> bool:
        return self.request.sampling.logprobs is not None

    def fold(self, delta: TokenDelta) -> Event | None:
        """Take in one delta; the event for the client, or None when it shows nothing new.

        A stop string found here finishes the choice even though its worker is still generating.
        """
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        self.completion.update(delta.token_ids, delta.finish_reason, delta.stop_reason)
        text = self.completion.text(delta=True)
        self.text += text
        logprobs = tuple(delta.logprobs) if self.wants_logprobs else ()
        self.logprobs.extend(logprobs)
        if text or logprobs or self.finished:
            return Event(self, text, logprobs, self.finished)
        return None


@dataclass(frozen=True)
class Event:
    """What a client sees of one choice at a time; a choice's last event is ``finished`` or an ``error``."""

    choice: Choice
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    error: ApiError | None = None
