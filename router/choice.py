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
    show_logprobs: bool = True  # False: logprobs asked for only to rank best_of candidates
    # prompt tokens 1.. (the first has none), once its worker sent them; None until then or if not asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

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

    @property
    def shows_logprobs(self) -> bool:
        """The client asked for the generated tokens' logprobs."""
        return self.wants_logprobs and self.show_logprobs

    @property
    def cumulative_logprob(self) -> float:
        return sum(lp.logprob for lp in self.logprobs)

    def fold(self, delta: TokenDelta) -> Event | None:
        """Take in one delta; the event for the client, or None when it shows nothing new.

        A stop string found here finishes the choice even though its worker is still generating.
        """
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        new_prompt_logprobs = None
        if (self.prompt_logprobs is None and self.request.sampling.prompt_logprobs is not None
                and (delta.token_ids or delta.finish_reason is not None)):  # they come with the first token
            self.prompt_logprobs = new_prompt_logprobs = tuple(delta.prompt_logprobs)
        self.completion.update(delta.token_ids, delta.finish_reason, delta.stop_reason)
        text = self.completion.text(delta=True)
        self.text += text
        logprobs = tuple(delta.logprobs) if self.wants_logprobs else ()
        self.logprobs.extend(logprobs)
        if text or logprobs or self.finished or new_prompt_logprobs is not None:
            return Event(self, text, logprobs, self.finished, prompt_logprobs=new_prompt_logprobs)
        return None


@dataclass(frozen=True)
class Event:
    """What a client sees of one choice at a time; a choice's last event is ``finished`` or an ``error``."""

    choice: Choice
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    error: ApiError | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # the choice's prompt logprobs, on its first event
