"""Prompt logprobs: the raw logprob, rank and top-k of prompt tokens, from the hidden states of the
positions before them, for the rows that asked (``SamplingParams.prompt_logprobs``).

Only those positions go through ``lm_head``, in slices of ``SLICE_ROWS`` (a slice's logits are
``SLICE_ROWS x vocab`` float32, freed before the next), so a long prompt never holds a
``[prompt, vocab]`` tensor and rows that did not ask pay nothing. Under chunked prefill each step
covers the chunk it computed: the prompt token at index ``i`` is scored from position ``i - 1``, so
a chunk ``[start, end)`` yields the logprobs of tokens ``start + 1 .. min(end, P - 1)``; the first
prompt token has none (OpenAI's and vLLM's null).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from shoal.workers.engine.outputs import TokenLogprobs

from .sampler import _to_device, _to_host

SLICE_ROWS = 512


@dataclass
class PromptLogprobsPlan:
    """What one step scores: per request a span of prompt tokens, and their hidden rows and ids."""

    spans: list[tuple[str, int, int, int]] = field(default_factory=list)  # (request id, first index, count, top-k)
    hidden_rows: list[int] = field(default_factory=list)  # flat token positions of the step's hidden states
    targets: list[int] = field(default_factory=list)  # the prompt token each position predicts

    def add(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, start: int, end: int,
            flat_start: int, k: int) -> None:
        """Positions ``[start, end)`` of a request were computed at flat rows ``flat_start..``; score the
        prompt tokens they predict (none for the position of the last prompt token: it samples)."""
        last = min(end, num_prompt_tokens - 1)
        if last <= start:
            return
        self.spans.append((request_id, start + 1, last - start, k))
        self.hidden_rows.extend(range(flat_start, flat_start + last - start))
        self.targets.extend(token_ids[start + 1:last + 1])


@dataclass(frozen=True)
class PromptLogprobsInFlight:
    spans: tuple[tuple[str, int, int, int], ...]
    targets: tuple[int, ...]  # the scored prompt tokens, span after span
    token_logprob: torch.Tensor  # [M] host copies (pinned on CUDA), read after the step's event
    rank: torch.Tensor  # [M]
    top_logprobs: torch.Tensor  # [M, k_max]
    top_ids: torch.Tensor  # [M, k_max]


def launch(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
           plan: PromptLogprobsPlan) -> PromptLogprobsInFlight | None:
    """Queue the plan's logprobs and their copies to the host (no host sync)."""
    # hidden: [num_tokens, hidden_size]
    if not plan.spans:
        return None
    dev = hidden.device
    rows = _to_device(plan.hidden_rows, torch.int64, dev)  # [M]
    targets = _to_device(plan.targets, torch.int64, dev)  # [M]
    k_max = max(k for *_, k in plan.spans)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, len(plan.targets), SLICE_ROWS):
        lp = compute_logits(hidden.index_select(0, rows[s:s + SLICE_ROWS])).to(torch.float32).log_softmax(-1)
        tok = targets[s:s + SLICE_ROWS].unsqueeze(1)  # [S, 1]
        tok_lp = lp.gather(1, tok)  # [S, 1]
        rank = (lp >= tok_lp).sum(dim=-1)  # [S]; ties count against the token, as for sampled tokens
        k = min(k_max, lp.shape[1])
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], tok[:, :0])  # [S, k]
        parts.append((tok_lp.squeeze(1), rank, top_lp, top_ids))
    tok_lp, rank, top_lp, top_ids = (torch.cat(p) for p in zip(*parts))
    return PromptLogprobsInFlight(tuple(plan.spans), tuple(plan.targets), _to_host(tok_lp), _to_host(rank), _to_host(top_lp),
                                  _to_host(top_ids))


def read(pending: PromptLogprobsInFlight) -> dict[str, tuple[int, tuple[TokenLogprobs, ...]]]:
    """request id -> (index of its first scored prompt token, the logprobs in prompt order)."""
    targets = pending.targets
    lp_l, rank_l = pending.token_logprob.tolist(), pending.rank.tolist()
    top_lp_l, top_ids_l = pending.top_logprobs.tolist(), pending.top_ids.tolist()
    out: dict[str, tuple[int, tuple[TokenLogprobs, ...]]] = {}
    j = 0
    for rid, first, count, k in pending.spans:
        out[rid] = (first, tuple(TokenLogprobs(targets[j + m], lp_l[j + m], rank_l[j + m],
                                               tuple(zip(top_ids_l[j + m][:k], top_lp_l[j + m][:k])))
                                 for m in range(count)))
        j += count
    return out
