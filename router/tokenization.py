"""Prompts to token ids, once, at the edge: completion prompts, chat templates, token strings.

The router tokenizes so that placement can hash the exact ids the engine will cache, and workers never
see text. Chat prompts are rendered with the model's template and then encoded without adding BOS/EOS:
the template writes its own special tokens (as HF ``apply_chat_template(tokenize=True)`` does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from shoal.workers.engine.detokenizer import IncrementalDetokenizer
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    text: str | None  # None when the client sent token ids
    token_ids: tuple[int, ...]


class RouterTokenizer:
    """A :class:`Tokenizer` with the router's conveniences; thread-safe (``tokenizers`` is)."""

    def __init__(self, tokenizer: Tokenizer, token_str_cache_size: int = 1 << 16):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.token_str = lru_cache(maxsize=token_str_cache_size)(self._token_str)

    # -- prompts --------------------------------------------------------------------------------

    def encode_completion_prompts(self, prompts: Sequence[str | Sequence[int]]) -> list[Prompt]:
        """Each text is encoded with the tokenizer's BOS policy; token ids pass through, range-checked."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(Prompt(p, tuple(self.tokenizer.encode(p, add_special_tokens=True))))
            else:
                ids = tuple(int(t) for t in p)
                self.check_ids(ids, "prompt")
                out.append(Prompt(None, ids))
        return out

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict | None = None) -> Prompt:
        """Render ``messages`` with the chat template and encode the text (no BOS/EOS added)."""
        kwargs = dict(template_kwargs or {})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)
        if continue_final_message:
            # The model continues the last message: cut whatever the template wrote after its content.
            last = messages[-1].get("content") or ""
            cut = text.rfind(last) if last else -1
            if cut >= 0:
                text = text[: cut + len(last)]
        return Prompt(text, tuple(self.tokenizer.encode(text, add_special_tokens=False)))

    def with_chat_template(self, template: str) -> "RouterTokenizer":
        """This tokenizer rendering chats with ``template`` (the router's ``--chat-template``)."""
        tokenizer = copy.copy(self.tokenizer)  # shares the (thread-safe) backend
        tokenizer.chat_template = template
        return RouterTokenizer(tokenizer)

    def check_ids(self, ids: Sequence[int], field: str) -> None:
        if not ids:
            raise ValueError(f"{field} must not be empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{field} token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    # -- outputs --------------------------------------------------------------------------------

    def detokenizer(self, prompt_ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's pieces for ``ids`` (``Ġ``-style for byte-level BPE), as vLLM's /tokenize."""
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _token_str(self, token_id: int) -> str:
        """One token's text for logprobs: decoded (readable spaces), special tokens kept."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
