"""One choice's text as OpenAI tool-call output: streamed ``delta`` fields and the whole ``message``.

A call's first piece carries its ``id`` (``call_`` + 24 hex digits), ``type`` and name; later pieces
its arguments' text, each under the call's ``index``. With ``parallel_tool_calls`` false only the first
call is kept. A choice that called a tool and stopped ends with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import uuid
from typing import Callable

from .base import ParsedText, ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallOutput:
    """Feeds one choice's text to its parser and says it in OpenAI's terms."""

    def __init__(self, parser: ToolParser, parallel: bool = True, new_id: Callable[[], str] = new_call_id) -> None:
        self.parser, self.parallel, self.new_id = parser, parallel, new_id
        self.ids: dict[int, str] = {}

    @property
    def called(self) -> bool:
        return bool(self.ids)

    def delta(self, text: str, finished: bool) -> dict:
        """The ``delta`` fields for the next piece of text (``{}`` when nothing can be said yet)."""
        parsed = self.parser.feed(text) if text else ParsedText()
        if finished:
            parsed += self.parser.finish()
        out: dict = {}
        if parsed.content:
            out["content"] = parsed.content
        calls = self._calls(parsed)
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason

    def _calls(self, parsed: ParsedText) -> list[dict]:
        merged: dict[int, dict] = {}  # one entry per call in a chunk, in order
        for d in parsed.calls:
            if d.index > 0 and not self.parallel:
                continue
            entry = merged.get(d.index)
            if entry is None:
                entry = merged[d.index] = {"index": d.index}
            if d.name is not None:  # a call's first piece: always the first of its chunk
                self.ids[d.index] = self.new_id()
                entry.update(id=self.ids[d.index], type="function", function={"name": d.name, "arguments": ""})
            entry.setdefault("function", {})
            if d.arguments:
                entry["function"]["arguments"] = entry["function"].get("arguments", "") + d.arguments
        return list(merged.values())


def whole_message(output: ToolCallOutput, text: str) -> tuple[str | None, list[dict]]:
    """(content or None, tool calls as OpenAI's ``[{id, type, function: {name, arguments}}]``)."""
    delta = output.delta(text, finished=True)
    calls = [{"id": c["id"], "type": "function",
              "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
             for c in delta.get("tool_calls", [])]
    content = delta.get("content")
    return (content or None) if calls else (content or ""), calls
