"""Turns the engine core's token deltas into user-facing outputs: text, stop strings, ``n > 1`` groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from .outputs import CompletionOutput, EngineCoreOutput, RequestOutput, TokenLogprobs


@dataclass
class _Child:
    index: int
    detokenizer: "IncrementalDetokenizer | None"  # noqa: F821
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, _Child]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, str] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params) -> list[str]:
        """Register a request; returns the engine-level ids of its ``n`` children."""
        children = {}
        for i in range(params.n):
            cid = child_request_id(request_id, i, params.n)
            detok = None
            if self.tokenizer is not None:
                from .detokenizer import IncrementalDetokenizer  # only engines with a tokenizer need it

                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            children[cid] = _Child(i, detok, logprobs=[] if params.logprobs is not None else None)
            self._child_to_parent[cid] = request_id
        self._parents[request_id] = _Parent(request_id, prompt, list(prompt_token_ids), children)
        return list(children)

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
            child.token_ids.extend(out.new_token_ids)
            if child.logprobs is not None:
                child.logprobs.extend(out.new_logprobs)
            child.finish_reason = out.finish_reason
            child.stop_reason = out.stop_reason
            if child.detokenizer is not None:
                hit = child.detokenizer.update(out.new_token_ids)
                if hit is not None and child.finish_reason is None:
                    child.finish_reason, child.stop_reason = "stop", hit
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
            done = child.finish_reason is not None
            # While running, the detokenizer holds back what could still be the start of a stop string.
            text = child.detokenizer.get_next_output_text(done, delta=False) if child.detokenizer else ""
            outs.append(CompletionOutput(
                index=child.index, text=text, token_ids=list(child.token_ids),
                finish_reason=child.finish_reason, stop_reason=child.stop_reason,
                logprobs=list(child.logprobs) if child.logprobs is not None else None))
        if finished:
            self.abort(parent.request_id)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs, finished,
                             parent.num_cached_tokens)
