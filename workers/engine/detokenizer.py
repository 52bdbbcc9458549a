"""Incremental detokenization with stop strings, one instance per request.

Text is decoded over a small sliding window of token ids (vLLM's prefix/read offsets) instead of
re-decoding the whole output per token, so a step costs O(window), not O(output length):

    ids:  ... | prefix_offset ........ read_offset ........ len(ids)
                 (already emitted,       (new, not yet
                  decoded for context)    emitted)

The new text is ``decode(ids[prefix:]) - decode(ids[prefix:read])``. The context tokens make the
difference exact where a token's text depends on its left neighbour: a SentencePiece ``▁word`` at the
start of a decode loses its space, and a UTF-8 character split over tokens decodes to U+FFFD until its
last byte arrives. While the window's text ends in U+FFFD, nothing is emitted and the offsets stay, so
the character comes out once, whole.

Invariants:
- ``output_text`` never contains a U+FFFD made by an incomplete UTF-8 sequence.
- After a stop string is hit, ``output_text`` ends exactly before it (or after it, with
  ``include_stop_str_in_output``), and holds no other stop string.
- Concatenated deltas from ``get_next_output_text(delta=True)`` are always a prefix of the final
  ``output_text``, and equal it once called with ``finished=True``: a stop string never leaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .sampling_params import SamplingParams

if TYPE_CHECKING:  # the tokenizer module is import-light, but the detokenizer only needs its decode()
    from ..tokenizer import Tokenizer

# Prompt tokens decoded as left context for the first output token (vLLM uses the same 5).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a request's output token ids into text as they arrive, and watches for stop strings."""

    def __init__(self, tokenizer: "Tokenizer", prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: tuple[str, ...] = tuple(params.stop)
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        # A delta may end inside a stop string that is still arriving: hold back that many chars.
        self._hold = max(map(len, self.stop)) - 1 if self.stop and not self.include_stop_str_in_output else 0

        self._ids: list[int] = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT:]]
        self._read_offset = len(self._ids)
        self._prefix_offset = 0
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached until the offsets move
        self._emitted = 0  # chars of output_text already returned as deltas

        self.output_text = ""
        self.num_output_tokens = 0
        self.stop_reason: str | None = None  # the stop string that ended the output, if any

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append ``new_token_ids``; return the stop string they completed (``output_text`` is then cut).

        Tokens that arrive after a stop string was hit (a step already in flight) are ignored.
        """
        if self.stop_reason is not None:
            return None
        checked_from = len(self.output_text)
        for token_id in new_token_ids:
            self._ids.append(int(token_id))
            self.output_text += self._decode_next()
            self.num_output_tokens += 1
        if not self.stop or self.num_output_tokens <= self.min_tokens:
            return None
        return self._check_stop(checked_from)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to hand out now: all of it (``delta=False``) or what is new since the last call.

        Until ``finished``, the last ``max(len(stop)) - 1`` chars are held back: they may be the start
        of a stop string whose end has not been generated yet.
        """
        length = len(self.output_text) if finished else max(len(self.output_text) - self._hold, 0)
        if not delta:
            return self.output_text[:length]
        start = self._emitted
        if length <= start:
            return ""
        self._emitted = length
        return self.output_text[start:length]

    # -- internals ------------------------------------------------------------------------------

    def _decode_next(self) -> str:
        """The text the last appended id completes: empty while a character is still incomplete."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            # Nothing visible yet (a skipped special token) or a UTF-8 sequence still open: keep the window.
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _check_stop(self, checked_from: int) -> str | None:
        """Cut ``output_text`` at the stop string that completes first.

        Text before ``checked_from`` held no complete stop string, so a new one ends after it (it may
        start before: stop strings straddle updates). "First" is the earliest end, then the earliest
        start: the answer does not depend on how the tokens were grouped into updates.
        """
        text = self.output_text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            start = text.find(stop, max(checked_from - len(stop) + 1, 0))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        self.output_text = text[:end] if self.include_stop_str_in_output else text[:start]
        self.stop_reason = stop
        return stop
