"""Grammar-constrained sampling: one compiled grammar per distinct constraint, one matcher per sequence,
one token bitmask per step for the whole batch.

``GrammarCompiler`` compiles a ``StructuredOutputs`` against the model's tokenizer once (a bounded
LRU of compiled matchers; each sequence gets a deep copy) and fills the step's bitmask for every
constrained row in one call of llguidance's thread pool. ``SequenceGrammar`` is one sequence's state:
it consumes each sampled token and says when the grammar is complete.

The state is rebuilt, never rolled back: a preempted request comes back to the runner as a new
request with its generated tokens, and its matcher is rebuilt by consuming them again (cheap next to
recomputing its KV). So recompute, prefix caching, chunked prefill (nothing is sampled before a
request's last prompt token) and ``n > 1`` (each child is its own request) need nothing more.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import llguidance
import torch

from shoal.workers.engine.invalid_param import InvalidParam
from shoal.workers.engine.structured_outputs import StructuredOutputs, check


@dataclass(frozen=True)
class TokenMask:
    """The step's allowed tokens for its constrained rows."""

    rows: torch.Tensor  # [C] int64: rows of the batch the mask applies to
    bitmask: torch.Tensor  # [C, ceil(vocab / 32)] int32: bit j of word w allows token 32 * w + j


class SequenceGrammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_id: int) -> None:
        """Advance by a sampled token. A token the mask forbade (never sampled, but an error is
        absorbing) leaves the matcher in error, which :attr:`finished` reports."""
        self.matcher.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """Nothing more can follow (complete, or in error): the sequence ends here."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Compiles constraints for one tokenizer and fills a batch's bitmask.

    ``tokenizer_json``: the ``tokenizers`` serialisation of the model's tokenizer; ``vocab_size``: the
    model's logits width (may exceed the tokenizer's; the extra ids are never allowed). ``compile`` may
    be called from any thread (a worker validates requests on its event loop while the engine thread
    starts sequences); ``fill`` only from the engine's.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 max_num_seqs: int, cache_size: int = 256, pin_memory: bool = False) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids))
        self._cache: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # guards _cache
        self._executor = llguidance.LLExecutor()
        self.words = (vocab_size + 31) // 32
        # Reused each step; pinned on CUDA so the copy to the device is queued like a kernel.
        self._bitmask = torch.empty((max(max_num_seqs, 1), self.words), dtype=torch.int32, pin_memory=pin_memory)

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The compiled matcher of ``spec`` (cached); ``InvalidParam`` naming the field if it cannot be."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        # Outside the lock: two threads may compile one spec at once; either result is the same.
        matcher = llguidance.LLMatcher(self.tokenizer, check(spec, self.tokenizer), log_level=0)
        if matcher.is_error():
            raise InvalidParam(spec.field, f"{spec.field} cannot be compiled: {matcher.get_error()}",
                               f"cannot be compiled: {matcher.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def start(self, spec: StructuredOutputs, output_token_ids: Sequence[int] = ()) -> SequenceGrammar:
        """A fresh sequence state, advanced over the tokens the sequence already generated."""
        seq = SequenceGrammar(self.compile(spec).deep_copy())
        for t in output_token_ids:
            seq.accept(t)
        return seq

    def fill(self, grammars: Sequence[SequenceGrammar | None], device: torch.device) -> TokenMask | None:
        """The step's mask: one row per constrained entry of ``grammars`` (None = unconstrained)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        mask = self._bitmask[:len(rows)]
        self._executor.unsafe_compute_mask_ptr([(grammars[i].matcher, k) for k, i in enumerate(rows)],
                                               mask.data_ptr(), self.words * 4, len(rows))
        idx = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cpu":
            return TokenMask(idx, mask)
        return TokenMask(idx.to(device, non_blocking=True), mask.to(device, non_blocking=True))
