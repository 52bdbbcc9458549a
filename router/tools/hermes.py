"""``hermes``: calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, the format
of Hermes 2/3, Qwen2.5 and Qwen3 (and SmolLM2's tool training); text outside the blocks is content."""

from __future__ import annotations

import json

from .base import CallReader, Content, ParsedText, ToolParser, partial_suffix, register_tool_parser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    arguments_key = "arguments"

    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        super().__init__(tool_names)
        self._buf = ""
        self._state = "text"  # text | call | close | skip
        self._call: CallReader | None = None
        self._content = Content()

    def feed(self, text: str) -> ParsedText:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ParsedText:
        out = self._run(final=True)
        if self._state == "call" and self._call is not None and not self._call.named:
            out += ParsedText(self._content.add(OPEN + self._call.raw))  # cut off before its name
        tail = self._content.flush() if self.num_calls == 0 else ""
        self._content.drop_held()
        return out + ParsedText(tail)

    def _run(self, final: bool) -> ParsedText:
        content: list[str] = []
        calls = []
        while self._buf:
            if self._state == "text":
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else partial_suffix(self._buf, OPEN)
                    content.append(self._content.add(self._buf[:len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._content.add(self._buf[:at]))
                self._buf = self._buf[at + len(OPEN):]
                self._call, self._state = self._reader(), "call"
            elif self._state == "call":
                used, deltas = self._call.feed(self._buf)
                self._buf = self._buf[used:]
                if deltas and deltas[0].name is not None:
                    self._content.drop_held()
                    self.num_calls += 1
                calls.extend(deltas)
                if self._call.failed:
                    if self._call.named:  # the rest of a broken call is not content
                        self._state = "skip"
                    else:  # not a call after all: its text is content
                        content.append(self._content.add(OPEN + self._call.raw))
                        self._state = "text"
                elif self._call.done:
                    self._state = "close"
                else:
                    break
            elif self._state == "close":  # optional whitespace, then </tool_call>
                rest = self._buf.lstrip()
                if rest.startswith(CLOSE):
                    self._buf, self._state = rest[len(CLOSE):], "text"
                elif not final and CLOSE.startswith(rest):
                    break
                else:  # no closing tag: carry on as text
                    self._buf, self._state = rest, "text"
            else:  # skip: up to and including the closing tag
                at = self._buf.find(CLOSE)
                if at < 0:
                    keep = 0 if final else partial_suffix(self._buf, CLOSE)
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._buf, self._state = self._buf[at + len(CLOSE):], "text"
        return ParsedText("".join(content), tuple(calls))

    @classmethod
    def call_text(cls, calls: list[tuple[str, dict]]) -> str:
        return "\n".join(f"{OPEN}\n{cls.call_json(name, args)}\n{CLOSE}" for name, args in calls)

    @classmethod
    def instructions(cls, tools: list[dict]) -> str:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{listed}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n'
                f"{CLOSE}")

    @classmethod
    def forced_grammar(cls, call_schema: dict, parallel: bool) -> str:
        start = "start: call+" if parallel else "start: call"
        return (f"{start}\n"
                f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
                f"body: %json {json.dumps(call_schema)}\n")
