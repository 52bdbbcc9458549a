"""The tool fields of a chat request (``tools``, ``tool_choice``, ``parallel_tool_calls``) as checked
values, and what they ask of the server: :func:`plan_tools` -> a :class:`ToolPlan` or a 400 naming the
field. ``functions`` / ``function_call`` (the legacy spelling) stay refused by name: see
``openai_protocol``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.workers.engine.sampling_params import InvalidParam

from .base import ToolParser, available_tool_parsers, tool_parser_class

# OpenAI's rule for function names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# The format of forced calls (and of the fallback history rendering) when no parser is configured.
DEFAULT_FORMAT = "hermes"
PARSER_FLAG = "--tool-call-parser"


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"must be 1 to 64 letters, digits, '_' or '-', got {v!r}")
        return v

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict | None) -> dict | None:
        if v is not None and v and v.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of an object (type 'object'), got type {v.get('type')!r}")
        return v


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict:
        return self.model_dump(exclude_none=True)


TOOL_CHOICE_SCHEMA = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "additionalProperties": False, "required": ["type", "function"],
     "properties": {"type": {"const": "function"},
                    "function": {"type": "object", "additionalProperties": False, "required": ["name"],
                                 "properties": {"name": {"type": "string"}}}}}]}


def parse_tool_choice(value: Any) -> tuple[str, str | None]:
    """``tool_choice`` -> ("none" | "auto" | "required" | "named", the named function or None)."""
    if value in ("none", "auto", "required"):
        return value, None
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "function"}:
        fn = value["function"]
        if isinstance(fn, dict) and set(fn) == {"name"} and isinstance(fn["name"], str):
            return "named", fn["name"]
    raise InvalidParam("tool_choice", "tool_choice: must be 'none', 'auto', 'required' or "
                                      '{"type": "function", "function": {"name": ...}}, got '
                                      f"{value!r}"[:300])


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask: ``choice`` none / auto / required / named, the tools (OpenAI dicts,
    for the template), the call format (``parser``), and whether several calls may come."""

    tools: tuple[ChatTool, ...]
    choice: str
    named: str | None
    parser: type[ToolParser]
    parallel: bool

    @property
    def parses(self) -> bool:
        """The output is read for calls (auto, required, named)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def names(self) -> frozenset[str]:
        """The names a call may have: one of the tools', the named one's when named."""
        return frozenset([self.named] if self.named else [t.function.name for t in self.tools])

    def template_tools(self) -> list[dict]:
        return [t.for_template() for t in self.tools]


def plan_tools(tools: list[ChatTool] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               configured_parser: str | None) -> ToolPlan | None:
    """The plan, or None when the request involves no tools; ``InvalidParam`` naming the field."""
    tools = list(tools or [])
    choice, named = parse_tool_choice("auto" if tool_choice is None and tools else tool_choice or "none")
    if not tools:
        if choice in ("required", "named"):
            raise InvalidParam("tool_choice", f"tool_choice: {choice!r} needs tools, and the request has none")
        return None
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise InvalidParam(f"tools.{i}.function.name",
                               f"tools.{i}.function.name: {tool.function.name!r} is named twice")
        seen.add(tool.function.name)
    if named is not None and named not in seen:
        raise InvalidParam("tool_choice.function.name", f"tool_choice.function.name: no tool is named {named!r}; "
                                                        f"the tools are {sorted(seen)}")
    if choice == "auto" and configured_parser is None:
        raise InvalidParam("tool_choice", "tool_choice: 'auto' (the default with tools) needs the server "
                                          f"started with {PARSER_FLAG} (one of {available_tool_parsers()}) to "
                                          "read calls from free text; 'required', a named function and "
                                          "'none' work without it")
    parser = tool_parser_class(configured_parser or DEFAULT_FORMAT)
    return ToolPlan(tuple(tools), choice, named, parser, parallel_tool_calls is not False)
