"""The offline API, shaped like vLLM's: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

from typing import Iterator, Sequence

from .config import EngineConfig
from .engine.outputs import RequestOutput
from .engine.sampling_params import SamplingParams
from .llm_engine import LLMEngine

Prompt = str | Sequence[int]


class LLM:
    """Runs an engine in this process. Keyword arguments are ``EngineConfig`` fields.

    >>> llm = LLM(model="smollm2-135m")
    >>> llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    """

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop helper processes (tensor-parallel ranks); a TP=1 engine has none."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One finished ``RequestOutput`` per prompt, in order. A prompt is a string or token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                ids.append(self.engine.add_request(prompt, p, priority=priority[i] if priority else 0))
        except ValueError:
            for rid in ids:  # a bad prompt in the list leaves nothing behind
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.engine.config.model!r} has no tokenizer and no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
            add_special_tokens=False) for c in conversations]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one completion as it grows (deltas; stop strings never leak)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() returns one completion: n must be 1, got {params.n}")
        rid = self.engine.add_request(prompt, params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            self.engine.abort_request(rid)  # no-op when finished; frees blocks if the caller stopped early

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(finished_only=True):
                done[out.request_id] = out
        return [done[i] for i in ids]
