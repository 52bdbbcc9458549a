"""OpenAI response bodies and stream chunks, built from a ``Generation``'s choices and events.

One builder per answer: every chunk and the whole response carry the same ``id`` and ``created``.
A builder only builds (pydantic models); ``streaming`` and ``respond`` serialize them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from .choice import Choice, Event
from .openai_protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk, ChatCompletionResponse,
                              ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                              CompletionChunk, CompletionLogprobs, CompletionResponse, PromptLogprob,
                              PromptLogprobs, ToolCall, TopLogprob, Usage)
from .tokenization import Prompt, RouterTokenizer
from .tools.output import ToolCallOutput, whole_message
from .tools.request import ToolPlan

if TYPE_CHECKING:
    from .generation import Generation


class ResponseBuilder(Protocol):
    ends_with_done: bool  # the stream's last line is ``data: [DONE]``

    def start_chunks(self) -> list:
        """What a stream sends before any token."""

    def event_chunk(self, ev: Event) -> BaseModel | list | None:
        """The chunk (or chunks) of one event; None when it has nothing to show yet."""

    def end_chunks(self, include_usage: bool) -> list:
        """What a stream sends once every choice has finished."""

    def error_chunks(self, body: dict) -> list:
        """What a stream sends for an error after its first token (``body``: the OpenAI error body)."""

    def response(self) -> BaseModel | dict:
        """The whole answer, once every choice has finished."""


class _Builder:
    """What both endpoints share: one id and time per answer, usage, and the end of a choice."""

    id_prefix: str
    chunk_type: type[ChatCompletionChunk] | type[CompletionChunk]

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer, prompt_logprobs: int | None = None,
                 continuous_usage: bool = False) -> None:
        self.gen, self.model, self.tok = gen, model, tok
        self.prompt_logprobs = prompt_logprobs  # top-k the client asked for in prompt_logprobs, None: not asked
        self.continuous_usage = continuous_usage  # every chunk with choices carries the usage so far
        self.id = f"{self.id_prefix}-{gen.id}"
        self.created = int(time.time())

    def _prompt_logprobs(self, lps) -> PromptLogprobs | None:
        """vLLM's shape: null for the first prompt token, then {token id: logprob, rank, decoded_token}
        holding the prompt token and the top ``prompt_logprobs``."""
        if self.prompt_logprobs is None or lps is None:
            return None
        out: PromptLogprobs = [None]
        for lp in lps:
            entry = {str(lp.token_id): PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                                     decoded_token=self.tok.token_str(lp.token_id))}
            for rank, (t, v) in enumerate(lp.top[:self.prompt_logprobs], start=1):
                entry.setdefault(str(t), PromptLogprob(logprob=v, rank=rank, decoded_token=self.tok.token_str(t)))
            out.append(entry)
        return out

    def _envelope(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def _chunk(self, choices: list, usage: Usage | None = None) -> BaseModel:
        if usage is None and choices and self.continuous_usage:
            usage = self.gen.usage()
        return self.chunk_type(**self._envelope(), choices=choices, usage=usage)

    ends_with_done = True

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.gen.usage())

    def end_chunks(self, include_usage: bool) -> list:
        return [self.usage_chunk()] if include_usage else []

    def error_chunks(self, body: dict) -> list:
        return [body]

    @staticmethod
    def _ending(ev: Event) -> dict:
        """A choice's finish and stop reasons go out with its last event only."""
        if not ev.finished:
            return {}
        return {"finish_reason": ev.choice.finish_reason, "stop_reason": ev.choice.stop_reason}


class CompletionBuilder(_Builder):
    """``/v1/completions`` bodies: text choices, logprobs as parallel lists.

    With ``echo`` and ``logprobs`` the echoed prompt's tokens lead the logprobs lists (the first with
    null logprobs, as OpenAI's); they come from the choice's prompt logprobs, which arrive with its
    first token, so a stream sends the echo with the choice's first event instead of before any.
    """

    id_prefix = "cmpl"
    chunk_type = CompletionChunk

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer, echo: bool,
                 logprobs: int | None = None, prompt_logprobs: int | None = None,
                 continuous_usage: bool = False) -> None:
        super().__init__(gen, model, tok, prompt_logprobs, continuous_usage)
        self.echo = [self._prompt_text(p) for p in gen.prompts] if echo else None
        self.echo_logprobs = logprobs if echo else None  # top-k of the echoed tokens, None: no logprobs
        self._offsets: dict[int, int] = {}  # choice index -> text_offset of its next token
        self._echoed: set[int] = set()  # choices whose stream has sent the echo

    def start_chunks(self) -> list[BaseModel]:
        if not self.echo or self.echo_logprobs is not None:
            return []
        self._echoed.update(c.index for c in self.gen.choices)
        return [self._chunk([CompletionChoice(index=c.index, text=self.echo[c.prompt_index])])
                for c in self.gen.choices]

    def event_chunk(self, ev: Event) -> BaseModel:
        c = ev.choice
        text, logprobs = ev.text, self._logprobs(c, ev.logprobs)
        if self.echo and c.index not in self._echoed:  # echo with logprobs: on the choice's first event
            self._echoed.add(c.index)
            text = self.echo[c.prompt_index] + text
            logprobs = self._with_echo(c, logprobs)
        return self._chunk([CompletionChoice(index=c.index, text=text, logprobs=logprobs,
                                             prompt_logprobs=self._prompt_logprobs(ev.prompt_logprobs),
                                             **self._ending(ev))])

    def response(self) -> CompletionResponse:
        choices = []
        for index, c in self.gen.final_choices():
            self._offsets.pop(c.index, None)  # the whole text: offsets count from its start again
            text = (self.echo[c.prompt_index] if self.echo else "") + c.text
            logprobs = self._logprobs(c, c.logprobs)
            if self.echo:
                logprobs = self._with_echo(c, logprobs)
            choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                            prompt_logprobs=self._prompt_logprobs(c.prompt_logprobs)))
        return CompletionResponse(**self._envelope(), choices=choices, usage=self.gen.usage())

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tok.decode(prompt.token_ids)

    def _with_echo(self, choice: Choice, generated: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """The echoed prompt tokens' logprobs (echo with logprobs), then the generated ones'."""
        k = self.echo_logprobs
        if k is None:
            return generated
        out = CompletionLogprobs()
        ids = self.gen.prompts[choice.prompt_index].token_ids
        scored = {i + 1: lp for i, lp in enumerate(choice.prompt_logprobs or ())}
        offset = 0
        for i, token_id in enumerate(ids):
            token = self.tok.token_str(token_id)
            lp = scored.get(i)
            out.tokens.append(token)
            out.text_offset.append(offset)
            out.token_logprobs.append(lp.logprob if lp is not None else None)
            top = None
            if lp is not None:
                top = {self.tok.token_str(t): v for t, v in lp.top[:k]}
                top.setdefault(token, lp.logprob)
            out.top_logprobs.append(top)
            offset += len(token)
        if generated is not None:
            for name in ("tokens", "text_offset", "token_logprobs", "top_logprobs"):
                getattr(out, name).extend(getattr(generated, name))
        return out

    def _logprobs(self, choice: Choice, lps) -> CompletionLogprobs | None:
        if not choice.shows_logprobs:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(choice.index, len(self.echo[choice.prompt_index]) if self.echo else 0)
        for lp in lps:
            token = self.tok.token_str(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            top = {self.tok.token_str(t): v for t, v in lp.top}
            top.setdefault(token, lp.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        self._offsets[choice.index] = offset
        return out


class ChatBuilder(_Builder):
    """``/v1/chat/completions`` bodies: assistant messages, per-token logprob objects, and with a tool
    plan that reads calls, each choice's text split into content and tool calls (``router/tools``)."""

    id_prefix = "chatcmpl"
    chunk_type = ChatCompletionChunk

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer, prompt_logprobs: int | None = None,
                 tools: ToolPlan | None = None, continuous_usage: bool = False) -> None:
        super().__init__(gen, model, tok, prompt_logprobs, continuous_usage)
        self.tools = tools if tools is not None and tools.parses else None
        self._outputs: dict[int, ToolCallOutput] = {}  # choice index -> its stream's parser

    def start_chunks(self) -> list[BaseModel]:
        return [self._chunk([ChatStreamChoice(index=c.index, delta={"role": "assistant", "content": ""})])
                for c in self.gen.choices]

    _sent_prompt_logprobs = False  # a stream sends them once: every choice has the same prompt

    def event_chunk(self, ev: Event) -> BaseModel | None:
        c = ev.choice
        ending = self._ending(ev)
        if self.tools is None:
            delta = {"content": ev.text} if ev.text else {}
        else:
            out = self._outputs.get(c.index)
            if out is None:
                out = self._outputs[c.index] = self._tool_output()
            delta = out.delta(ev.text, ev.finished)
            if ending:
                ending["finish_reason"] = out.finish_reason(ending["finish_reason"])
            elif not delta and not ev.logprobs and ev.prompt_logprobs is None:
                return None
        chunk = self._chunk([ChatStreamChoice(index=c.index, delta=delta, logprobs=self._logprobs(c, ev.logprobs),
                                              **ending)])
        if ev.prompt_logprobs is not None and not self._sent_prompt_logprobs:
            self._sent_prompt_logprobs = True
            chunk.prompt_logprobs = self._prompt_logprobs(ev.prompt_logprobs)
        return chunk

    def response(self) -> ChatCompletionResponse:
        choices = []
        for index, c in self.gen.final_choices():
            message, finish_reason = ChatResponseMessage(content=c.text), c.finish_reason
            if self.tools is not None:
                out = self._tool_output()
                content, calls = whole_message(out, c.text)
                message = ChatResponseMessage(content=content, tool_calls=[ToolCall(**t) for t in calls] or None)
                finish_reason = out.finish_reason(finish_reason)
            choices.append(ChatChoice(index=index, message=message, logprobs=self._logprobs(c, c.logprobs),
                                      finish_reason=finish_reason, stop_reason=c.stop_reason))
        first = next((c.prompt_logprobs for c in self.gen.choices if c.prompt_logprobs is not None), None)
        return ChatCompletionResponse(**self._envelope(), choices=choices, usage=self.gen.usage(),
                                      prompt_logprobs=self._prompt_logprobs(first))

    def _tool_output(self) -> ToolCallOutput:
        return ToolCallOutput(self.tools.parser(self.tools.names), parallel=self.tools.parallel)

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.tok.token_str(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    def _logprobs(self, choice: Choice, lps) -> ChatChoiceLogprobs | None:
        if not choice.shows_logprobs:
            return None
        content = []
        for lp in lps:
            e = self._entry(lp.token_id, lp.logprob)
            content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                            top_logprobs=[self._entry(t, v) for t, v in lp.top]))
        return ChatChoiceLogprobs(content=content)
