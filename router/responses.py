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
                              CompletionChunk, CompletionLogprobs, CompletionResponse, ToolCall, TopLogprob,
                              Usage)
from .tokenization import Prompt, RouterTokenizer
from .tools.output import ToolCallOutput, whole_message
from .tools.request import ToolPlan

if TYPE_CHECKING:
    from .generation import Generation


class ResponseBuilder(Protocol):
    def start_chunks(self) -> list[BaseModel]:
        """What a stream sends before any token."""

    def event_chunk(self, ev: Event) -> BaseModel | None:
        """The chunk of one event; None when it has nothing to show yet."""

    def usage_chunk(self) -> BaseModel: ...

    def response(self) -> BaseModel:
        """The whole answer, once every choice has finished."""


class _Builder:
    """What both endpoints share: one id and time per answer, usage, and the end of a choice."""

    id_prefix: str
    chunk_type: type[ChatCompletionChunk] | type[CompletionChunk]

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer) -> None:
        self.gen, self.model, self.tok = gen, model, tok
        self.id = f"{self.id_prefix}-{gen.id}"
        self.created = int(time.time())

    def _envelope(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model}

    def _chunk(self, choices: list, usage: Usage | None = None) -> BaseModel:
        return self.chunk_type(**self._envelope(), choices=choices, usage=usage)

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.gen.usage())

    @staticmethod
    def _ending(ev: Event) -> dict:
        """A choice's finish and stop reasons go out with its last event only."""
        if not ev.finished:
            return {}
        return {"finish_reason": ev.choice.finish_reason, "stop_reason": ev.choice.stop_reason}


class CompletionBuilder(_Builder):
    """``/v1/completions`` bodies: text choices, logprobs as parallel lists."""

    id_prefix = "cmpl"
    chunk_type = CompletionChunk

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer, echo: bool) -> None:
        super().__init__(gen, model, tok)
        self.echo = [self._prompt_text(p) for p in gen.prompts] if echo else None
        self._offsets: dict[int, int] = {}  # choice index -> text_offset of its next token

    def start_chunks(self) -> list[BaseModel]:
        if not self.echo:
            return []
        return [self._chunk([CompletionChoice(index=c.index, text=self.echo[c.prompt_index])])
                for c in self.gen.choices]

    def event_chunk(self, ev: Event) -> BaseModel:
        c = ev.choice
        return self._chunk([CompletionChoice(index=c.index, text=ev.text, logprobs=self._logprobs(c, ev.logprobs),
                                             **self._ending(ev))])

    def response(self) -> CompletionResponse:
        choices = []
        for c in self.gen.choices:
            self._offsets.pop(c.index, None)  # the whole text: offsets count from its start again
            text = (self.echo[c.prompt_index] if self.echo else "") + c.text
            choices.append(CompletionChoice(index=c.index, text=text, logprobs=self._logprobs(c, c.logprobs),
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(**self._envelope(), choices=choices, usage=self.gen.usage())

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tok.decode(prompt.token_ids)

    def _logprobs(self, choice: Choice, lps) -> CompletionLogprobs | None:
        if not choice.wants_logprobs:
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

    def __init__(self, gen: Generation, model: str, tok: RouterTokenizer, tools: ToolPlan | None = None) -> None:
        super().__init__(gen, model, tok)
        self.tools = tools if tools is not None and tools.parses else None
        self._outputs: dict[int, ToolCallOutput] = {}  # choice index -> its stream's parser

    def start_chunks(self) -> list[BaseModel]:
        return [self._chunk([ChatStreamChoice(index=c.index, delta={"role": "assistant", "content": ""})])
                for c in self.gen.choices]

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
            elif not delta and not ev.logprobs:
                return None
        return self._chunk([ChatStreamChoice(index=c.index, delta=delta, logprobs=self._logprobs(c, ev.logprobs),
                                             **ending)])

    def response(self) -> ChatCompletionResponse:
        choices = []
        for c in self.gen.choices:
            message, finish_reason = ChatResponseMessage(content=c.text), c.finish_reason
            if self.tools is not None:
                out = self._tool_output()
                content, calls = whole_message(out, c.text)
                message = ChatResponseMessage(content=content, tool_calls=[ToolCall(**t) for t in calls] or None)
                finish_reason = out.finish_reason(finish_reason)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=self._logprobs(c, c.logprobs),
                                      finish_reason=finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(**self._envelope(), choices=choices, usage=self.gen.usage())

    def _tool_output(self) -> ToolCallOutput:
        return ToolCallOutput(self.tools.parser(self.tools.names), parallel=self.tools.parallel)

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.tok.token_str(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    def _logprobs(self, choice: Choice, lps) -> ChatChoiceLogprobs | None:
        if not choice.wants_logprobs:
            return None
        content = []
        for lp in lps:
            e = self._entry(lp.token_id, lp.logprob)
            content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                            top_logprobs=[self._entry(t, v) for t, v in lp.top]))
        return ChatChoiceLogprobs(content=content)
