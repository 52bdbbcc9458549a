"""``llama3_json``: Llama 3.1/3.2/3.3's JSON tool calls. An answer that is a call starts with
``{"name": ..., "parameters": {...}}`` (``<|python_tag|>`` before it is allowed), several calls
separated by ``;``; an answer that starts with anything else is content, whole."""

from __future__ import annotations

import json

from .base import CallReader, Content, ParsedText, ToolParser, register_tool_parser

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    arguments_key = "parameters"

    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        super().__init__(tool_names)
        self._buf = ""
        self._state = "start"  # start | call | between | next | text
        self._call: CallReader | None = None
        self._seen = ""  # the text held before the first call is named (content if it is none)
        self._content = Content()

    def feed(self, text: str) -> ParsedText:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ParsedText:
        out = self._run(final=True)
        if self._state == "call" and self.num_calls == 0:  # cut off before its name: content after all
            out += ParsedText(self._content.add(self._seen + self._call.raw))
        tail = self._content.flush() if self.num_calls == 0 else ""
        self._content.drop_held()
        return out + ParsedText(tail)

    def _run(self, final: bool) -> ParsedText:
        content: list[str] = []
        calls = []
        while self._buf:
            if self._state == "start":
                rest = self._buf.lstrip()
                if rest.startswith(PYTHON_TAG):
                    self._seen, self._buf = self._buf[:len(self._buf) - len(rest) + len(PYTHON_TAG)], \
                        rest[len(PYTHON_TAG):]
                    self._state = "next"
                elif rest.startswith("{"):
                    self._seen, self._buf = self._buf[:len(self._buf) - len(rest)], rest
                    self._state = "next"
                elif not final and PYTHON_TAG.startswith(rest):
                    break
                else:
                    self._state = "text"
            elif self._state == "next":  # whitespace, then a call's "{"
                rest = self._buf.lstrip()
                if not rest and not final:
                    break
                if rest.startswith("{"):
                    self._buf = rest
                    self._call, self._state = self._reader(), "call"
                else:
                    self._state = "text"
            elif self._state == "call":
                used, deltas = self._call.feed(self._buf)
                self._buf = self._buf[used:]
                if deltas and deltas[0].name is not None:
                    self.num_calls += 1
                calls.extend(deltas)
                if self._call.failed and not self._call.named:  # not a call: the text is content
                    content.append(self._content.add(
                        (self._seen if self.num_calls == 0 else "") + self._call.raw))
                    self._state = "text"
                elif self._call.failed or self._call.done:
                    self._state = "between"
                else:
                    break
            elif self._state == "between":  # whitespace, then ";" (or ",") before the next call
                rest = self._buf.lstrip()
                if not rest and not final:
                    break
                if rest[:1] in (";", ","):
                    self._buf, self._state = rest[1:], "next"
                else:
                    self._buf, self._state = rest, "text"
            else:
                content.append(self._content.add(self._buf))
                self._buf = ""
        return ParsedText("".join(content), tuple(calls))

    @classmethod
    def call_text(cls, calls: list[tuple[str, dict]]) -> str:
        return "; ".join(cls.call_json(name, args) for name, args in calls)

    @classmethod
    def instructions(cls, tools: list[dict]) -> str:
        listed = "\n\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("Given the following functions, please respond with a JSON for a function call with its "
                "proper arguments that best answers the given prompt.\n\n"
                'Respond in the format {"name": function name, "parameters": dictionary of argument name '
                "and its value}. Do not use variables.\n\n" + listed)

    @classmethod
    def forced_grammar(cls, call_schema: dict, parallel: bool) -> str:
        start = 'start: body ("; " body)*' if parallel else "start: body"
        return f"{start}\nbody: %json {json.dumps(call_schema)}\n"
