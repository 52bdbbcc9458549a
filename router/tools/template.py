"""Chat history with tools, as the chat template's input.

OpenAI clients send an assistant turn's ``tool_calls`` with ``arguments`` as a JSON string; Hugging
Face templates expect an object: each is parsed (a 400 naming it when it is not a JSON object). A
template that takes ``tools`` (Qwen2.5's, Llama 3.1's, Hermes') gets them as the ``tools`` variable
and renders calls and ``tool`` turns itself. A template that does not (the bundled SmolLM2's) gets a
fallback written in the call format's own words: the tools announced in the system message (the
format's :meth:`~.base.ToolParser.instructions`; after the client's own system text) and each
assistant call written out as the model would write it. ``tool`` turns stay ``tool`` turns: ChatML
templates (SmolLM2's) render any role, and SmolLM2-135M answered from a result in a ``tool`` turn but
echoed it back when it came as a user turn wrapped in ``<tool_response>`` (Qwen2.5's rendering).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import jinja2
import jinja2.meta

from shoal.workers.engine.invalid_param import InvalidParam

from .base import ToolParser


def template_input(messages: list[dict], tools: list[dict] | None, fmt: type[ToolParser],
                   chat_template: str | None) -> tuple[list[dict], dict]:
    """(the messages to render, extra template variables)."""
    messages = [_with_argument_objects(m, i) for i, m in enumerate(messages)]
    if chat_template and takes_tools(chat_template):
        return messages, ({"tools": tools} if tools else {})
    if not tools and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages, {}
    return fallback_messages(messages, tools or [], fmt), {}


@lru_cache(maxsize=32)
def takes_tools(chat_template: str) -> bool:
    """The template reads a ``tools`` variable."""
    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(chat_template))
    except jinja2.TemplateError:  # an extension tag plain jinja2 does not know: look at the text
        return re.search(r"\btools\b", chat_template) is not None


def fallback_messages(messages: list[dict], tools: list[dict], fmt: type[ToolParser]) -> list[dict]:
    out: list[dict] = []
    if tools:
        text = fmt.instructions(tools)
        if messages and messages[0].get("role") in ("system", "developer"):
            own = messages[0].get("content") or ""
            messages = [{**messages[0], "content": f"{own}\n\n{text}" if own else text}, *messages[1:]]
        else:
            out.append({"role": "system", "content": text})
    for m in messages:
        if m.get("tool_calls"):
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            own = m.get("content") or ""
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (f"{own}\n" if own else "") + fmt.call_text(calls)
        out.append(m)
    return out


def _with_argument_objects(message: dict, i: int) -> dict:
    calls = message.get("tool_calls")
    if calls is None:
        return message
    where = f"messages.{i}.tool_calls"
    if message.get("role") != "assistant":
        raise InvalidParam(where, f"{where}: only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise InvalidParam(where, f"{where}: must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParam(f"{where}.{j}.function.name",
                               f"{where}.{j}.function.name: each tool call needs a function name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise InvalidParam(f"{where}.{j}.function.arguments",
                                   f"{where}.{j}.function.arguments: not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise InvalidParam(f"{where}.{j}.function.arguments",
                               f"{where}.{j}.function.arguments: must be a JSON object")
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return {**message, "tool_calls": out}
