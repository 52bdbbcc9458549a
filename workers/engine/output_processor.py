"""Turns the engine core's token deltas into user-facing outputs: text, stop strings, ``n > 1`` groups.

Written once, used twice: :class:`CompletionState` (one completion's stop-string and finish rule) and
:func:`sibling_params` (the ``n`` fan-out's per-child params) serve this offline/engine path and the
router (``shoal.router.choice``), which detokenizes its workers' token streams itself. This module
imports no torch: the router imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .outputs import CompletionOutput, EngineCoreOutput, RequestOutput, TokenLogprobs
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .detokenizer import IncrementalDetokenizer


def sibling_params(params: SamplingParams, index: int) -> SamplingParams:
    """Child ``index`` of an ``n``-way request: ``n = 1``, and seed + index (vLLM's rule) so that
    seeded siblings do not draw the same random numbers."""
    if params.n == 1 and (params.seed is None or index == 0):
        return params
    return params.replace(n=1, seed=None if params.seed is None else params.seed + index)


@dataclass(eq=False)
class CompletionState:
    """One completion as its tokens arrive: how many, and how (whether) it finished.

    The rule: a stop string the detokenizer finds finishes the completion with ``finish_reason
    "stop"`` and the string as ``stop_reason``, over whatever the engine reported for the same tokens
    (vLLM's rule); otherwise the engine's finish stands. Tokens after the finish (a step already in
    flight) are not taken in. Without a detokenizer (token-id-only engines) only the engine finishes it.
    """

    detokenizer: "IncrementalDetokenizer | None"
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, token_ids: Sequence[int], finish_reason: str | None = None,
               stop_reason: int | str | None = None) -> str | None:
        """Take in new tokens and the engine's finish for them; the stop string they completed, if
        any (its producer must then stop generating)."""
        if self.finished:
            return None
        self.num_tokens += len(token_ids)
        hit = self.detokenizer.update(token_ids) if self.detokenizer is not None and token_ids else None
        if hit is not None:
            self.finish_reason, self.stop_reason = "stop", hit
        elif finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        return hit

    def text(self, delta: bool) -> str:
        """The text to show now: all of it or what is new (``delta``); until finished, what could
        still be the start of a stop string is held back, so a stop string never leaks."""
        if self.detokenizer is None:
            return ""
        return self.detokenizer.get_next_output_text(self.finished, delta=delta)


@dataclass
class _Child:
    index: int
    state: CompletionState
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, _Child]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # from the first child that has them

    @property
    def finished(self) -> bool:
        return all(c.state.finished for c in self.children.values())


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """Register a request; returns its ``n`` children: (engine-level id, params) each."""
        children, fanned = {}, []
        for i in range(params.n):
            cid = child_request_id(request_id, i, params.n)
            detok = None
            if self.tokenizer is not None:
                from .detokenizer import IncrementalDetokenizer  # only engines with a tokenizer need it

                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            children[cid] = _Child(i, CompletionState(detok), logprobs=[] if params.logprobs is not None else None)
            self._child_to_parent[cid] = request_id
            fanned.append((cid, sibling_params(params, i)))
        self._parents[request_id] = _Parent(request_id, prompt, list(prompt_token_ids), children)
        return fanned

    def child_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return [] if parent is None else list(parent.children)

    def process(self, outputs: list[EngineCoreOutput], finished_only: bool = False,
                ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the updated requests (only the finished ones with ``finished_only``) and the
        (child id, stop string) pairs the engine must stop."""
        touched: dict[str, _Parent] = {}
        stopped: list[tuple[str, str]] = []
        for out in outputs:
            pid = self._child_to_parent.get(out.request_id)
            if pid is None:
                continue
            parent = self._parents[pid]
            child = parent.children[out.request_id]
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if out.prompt_logprobs is not None and parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None, *out.prompt_logprobs]
            child.token_ids.extend(out.new_token_ids)
            if child.logprobs is not None:
                child.logprobs.extend(out.new_logprobs)
            hit = child.state.update(out.new_token_ids, out.finish_reason, out.stop_reason)
            if hit is not None and out.finish_reason is None:  # the engine is still generating it
                stopped.append((out.request_id, hit))
            touched[pid] = parent
        parents = [p for p in touched.values() if p.finished] if finished_only else touched.values()
        return [self._request_output(p) for p in parents], stopped

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its children's ids for the engine to abort."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        for cid in parent.children:
            self._child_to_parent.pop(cid, None)
        return list(parent.children)

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def _request_output(self, parent: _Parent) -> RequestOutput:
        finished = parent.finished
        outs = []
        for child in parent.children.values():
            state = child.state
            outs.append(CompletionOutput(
                index=child.index, text=state.text(delta=False), token_ids=list(child.token_ids),
                finish_reason=state.finish_reason, stop_reason=state.stop_reason,
                logprobs=list(child.logprobs) if child.logprobs is not None else None))
        if finished:
            self.abort(parent.request_id)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             parent.num_cached_tokens, parent.prompt_logprobs)
