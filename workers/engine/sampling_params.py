"""What a caller asks of one generation: the vLLM-shaped ``SamplingParams``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

from .invalid_param import InvalidParam
from .structured_outputs import StructuredOutputs

__all__ = ["InvalidParam", "SamplingParams", "StructuredOutputs", "bad_words_token_ids"]

MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value


def _check(ok: bool, name: str, limit: str, value: object) -> None:
    if not ok:
        reason = f"must be {limit}, got {value!r}"
        raise InvalidParam(name, f"{name} {reason}", reason)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping rules for one request; validated on construction.

    ``temperature == 0`` means greedy. ``top_k <= 0`` (or -1) and ``top_p == 1`` and ``min_p == 0``
    disable those filters. Penalties follow the OpenAI / vLLM definitions: ``presence_penalty`` and
    ``frequency_penalty`` act on generated tokens, ``repetition_penalty`` (CTRL-style, 1 = off) on prompt
    and generated tokens. ``logprobs = k`` returns the sampled token's logprob plus the top ``k``.

    Token filters (vLLM's): ``logit_bias`` (token id -> value in [-100, 100], added to that logit;
    a dict is accepted and stored as sorted pairs), ``allowed_token_ids`` (None = all; else only these
    may be sampled), ``bad_words`` (strings whose token sequences may not be generated; the engine
    turns them into ``bad_words_token_ids`` with its tokenizer, :func:`bad_words_token_ids`).
    ``prompt_logprobs = k``: the logprob, rank and top ``k`` of every prompt token after the first
    (a request asking for them computes its whole prompt: prefix-cached tokens have no logits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # The output must match this constraint (grammar-masked sampling); None = unconstrained. A
    # finished grammar ends the request (finish_reason "stop"), with or without ignore_eos.
    structured_outputs: StructuredOutputs | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # from bad_words (the tokenizer's), or given
    prompt_logprobs: int | None = None
    has_token_filters: ClassVar[bool] = False  # set per instance: logit_bias, allowed or bad words

    def __post_init__(self) -> None:
        # Accept lists / a single string for convenience; store tuples so the object stays hashable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        self._normalise_token_filters()
        _check(self.n >= 1, "n", ">= 1", self.n)
        _check(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "-1 (off), 0 (off) or >= 1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(self.repetition_penalty > 0, "repetition_penalty", "> 0", self.repetition_penalty)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})",
                   self.min_tokens)
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", ">= 0", self.logprobs)
        _check(all(s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
               "structured_outputs", "a StructuredOutputs or None", self.structured_outputs)
        _check(self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", ">= 0",
               self.prompt_logprobs)

    def _normalise_token_filters(self) -> None:
        """logit_bias, allowed_token_ids and the bad words as hashable tuples, each value checked."""
        bias = self.logit_bias
        items = bias.items() if isinstance(bias, dict) else (bias or ())
        pairs: dict[int, float] = {}
        for key, value in items:
            token = _token_key(key)
            _check(token is not None, "logit_bias", "a map whose keys are token ids (integers >= 0)", key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            _check(ok and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS, "logit_bias",
                   f"a map to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] (token {token})", value)
            pairs[token] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))
        if self.allowed_token_ids is not None:
            ids = tuple(int(t) for t in self.allowed_token_ids)
            _check(bool(ids) and min(ids) >= 0, "allowed_token_ids", "a non-empty list of token ids >= 0",
                   self.allowed_token_ids)
            object.__setattr__(self, "allowed_token_ids", ids)
        words = (self.bad_words,) if isinstance(self.bad_words, str) else tuple(self.bad_words or ())
        _check(all(isinstance(w, str) and w.strip() for w in words), "bad_words",
               "a list of strings that are not empty or blank", self.bad_words)
        object.__setattr__(self, "bad_words", words)
        seqs = tuple(tuple(int(t) for t in w) for w in (self.bad_words_token_ids or ()))
        _check(all(w and min(w) >= 0 for w in seqs), "bad_words",
               "token sequences that are not empty, of ids >= 0", self.bad_words_token_ids)
        object.__setattr__(self, "bad_words_token_ids", seqs)
        # Read per row per step by the sampler: one attribute, not three tests (not a field: derived).
        object.__setattr__(self, "has_token_filters",
                           bool(self.logit_bias) or self.allowed_token_ids is not None or bool(seqs))

    def check_vocab(self, vocab_size: int) -> None:
        """``InvalidParam`` naming the field when a token id of a filter is outside ``[0, vocab_size)``."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise InvalidParam(name, f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                   f"token id {bad} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def with_bad_words_resolved(self, encode: Callable[[str], Sequence[int]]) -> "SamplingParams":
        """These params with ``bad_words_token_ids`` from ``bad_words`` (``encode``: text -> ids, no
        special tokens); unchanged when there are no words or they are resolved already."""
        if not self.bad_words or self.bad_words_token_ids:
            return self
        return self.replace(bad_words_token_ids=bad_words_token_ids(self.bad_words, encode))


def _token_key(key: object) -> int | None:
    """A logit_bias key as a token id: an int >= 0 or its decimal string (JSON keys are strings)."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def bad_words_token_ids(words: Sequence[str], encode: Callable[[str], Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """vLLM's rule: each word as it tokenizes alone, and with a leading space (a word in the middle of
    text) when that gives a different first token and as many tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        out.append(bare)
        spaced = tuple(encode(" " + word.lstrip()))
        if bare and spaced and spaced[0] != bare[0] and len(spaced) == len(bare):  # (an empty one is refused)
            out.append(spaced)
    return tuple(out)
