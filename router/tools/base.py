"""The tool-call parser protocol, the pieces every format shares, and the name -> class registry.

A parser reads one choice's generated text, streamed in any fragments, and splits it into content
and tool calls: :meth:`ToolParser.feed` returns what can be said now, :meth:`ToolParser.finish` the
rest once the text has ended. Text that might be the start of a call's markup is held back until it
is known not to be, so no markup ever reaches ``content``. A whole answer is the same parser fed the
whole text at once: streamed and whole answers cannot disagree.

Each format also says how a call is written (:meth:`ToolParser.call_text`: history rendering when a
chat template does not take tools), how tools are announced in that case (:meth:`instructions`), and
the grammar that forces its calls (:meth:`forced_grammar`, for ``tool_choice`` required or named).
A parser instance serves one choice; the router makes one per choice (no singletons).
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from .call_scanner import CallScanner


@dataclass(frozen=True)
class CallDelta:
    """A piece of call number ``index`` (0, 1, ... in the choice): its name once, then arguments text."""

    index: int
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ParsedText:
    """What a piece of generated text says: content to show and call pieces, in order within each."""

    content: str = ""
    calls: tuple[CallDelta, ...] = ()

    def __add__(self, other: "ParsedText") -> "ParsedText":
        return ParsedText(self.content + other.content, self.calls + other.calls)


class CallReader:
    """One call being read: the scanner's name and arguments as ``CallDelta``s, the arguments held
    until the name is out (a model may write them first); ``raw``: the text it used. A name that is
    not one of ``names`` (when given) makes it no call: ``{"name": "Bob", "age": 30}`` is content."""

    def __init__(self, index: int, arguments_keys: tuple[str, ...], names: frozenset[str] | None = None) -> None:
        self.index = index
        self.scanner = CallScanner(arguments_keys)
        self.names = names
        self.named = False
        self.raw = ""

    def feed(self, text: str) -> tuple[int, list[CallDelta]]:
        used = self.scanner.feed(text)
        self.raw += text[:used]
        out: list[CallDelta] = []
        name = self.scanner.name
        if not self.named and name is not None and self.names is not None and name not in self.names:
            self.scanner.failed = True
        if not self.named and name is not None and not self.scanner.failed:
            self.named = True
            out.append(CallDelta(self.index, name=self.scanner.name))
        if self.named:
            args = self.scanner.take_arguments()
            if args:
                out.append(CallDelta(self.index, arguments=args))
        return used, out

    @property
    def done(self) -> bool:
        return self.scanner.done

    @property
    def failed(self) -> bool:
        return self.scanner.failed


class Content:
    """Content text out, with each run of whitespace held until more content follows it: whitespace
    next to a call is dropped (``"Let me check.\\n<tool_call>..."`` says ``"Let me check."``), and an
    answer without calls keeps all of its text."""

    def __init__(self) -> None:
        self._held = ""

    def add(self, text: str) -> str:
        text = self._held + text
        kept = text.rstrip()
        self._held = text[len(kept):]
        return kept

    def drop_held(self) -> None:
        self._held = ""

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a proper beginning of ``tag`` (to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolParser(ABC):
    """One choice's text -> content and tool calls. Subclasses set ``arguments_key`` (the key their
    format writes the arguments under) and implement the four format methods."""

    name: str = "base"
    arguments_key: str = "arguments"
    arguments_keys: tuple[str, ...] = ("arguments", "parameters")  # accepted when reading

    def __init__(self, tool_names: frozenset[str] | None = None) -> None:
        self.tool_names = tool_names  # None: any name is a call
        self.num_calls = 0  # calls started (named) so far

    def _reader(self) -> CallReader:
        return CallReader(self.num_calls, self.arguments_keys, self.tool_names)

    @abstractmethod
    def feed(self, text: str) -> ParsedText:
        """The next piece of generated text; -> what can be said of it now."""

    @abstractmethod
    def finish(self) -> ParsedText:
        """The text has ended; -> whatever was held back."""

    def parse(self, text: str) -> ParsedText:
        """A whole text: the same as feeding it in one piece and finishing."""
        return self.feed(text) + self.finish()

    # -- the format ------------------------------------------------------------------------------

    @classmethod
    def call_json(cls, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, cls.arguments_key: arguments}, ensure_ascii=False)

    @classmethod
    @abstractmethod
    def call_text(cls, calls: list[tuple[str, dict]]) -> str:
        """``(name, arguments)`` calls written as the model writes them (an assistant turn in history)."""

    @classmethod
    @abstractmethod
    def instructions(cls, tools: list[dict]) -> str:
        """A system-prompt text announcing ``tools`` (OpenAI tool dicts) and how to call them, for
        chat templates that take no tools."""

    @classmethod
    @abstractmethod
    def forced_grammar(cls, call_schema: dict, parallel: bool) -> str:
        """A Lark grammar (llguidance) whose every sentence is one call (or, ``parallel``, one or more)
        in this format, each call's object matching ``call_schema`` (JSON schema)."""


# -- registry -----------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: make ``tool_parser_class(name)`` return this class. Names are unique."""

    def deco(cls: type[ToolParser]) -> type[ToolParser]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"tool-call parser {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_tool_parsers() -> list[str]:
    return sorted(_REGISTRY)


def tool_parser_class(name: str) -> type[ToolParser]:
    """The registered class; an unknown name raises ValueError naming the registered ones."""
    cls = _REGISTRY.get(name)
    if cls is None or inspect.isabstract(cls):
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {available_tool_parsers()}")
    return cls
