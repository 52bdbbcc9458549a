"""A Responses request as the chat request the chat endpoint serves, and its errors named back.

``instructions`` becomes the first (system) message; ``input`` items become chat messages: a message
item as it is, consecutive ``function_call`` items one assistant turn with ``tool_calls`` (their
``call_id`` as the call's id), a ``function_call_output`` a ``tool`` turn. ``text.format`` becomes
``response_format``, function tools chat tools, ``tool_choice: {"type": "function", "name"}`` chat's
named choice, ``max_output_tokens`` ``max_completion_tokens``. The chat machinery's errors name chat
fields; :func:`responses_param` gives the Responses field they came from.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from shoal.workers.engine.sampling_params import InvalidParam

from ..errors import ApiError
from ..openai_protocol import ChatCompletionRequest, validation_error_body
from .protocol import FunctionCallItem, FunctionCallOutputItem, MessageItem, ResponsesRequest


class ResponsesChatRequest(ChatCompletionRequest):
    """The chat request of a Responses request: its sampling errors name the Responses fields."""

    @property
    def max_tokens_field(self) -> str:
        return "max_output_tokens"

    def request_field(self, sampling_field: str) -> str:
        return responses_param(super().request_field(sampling_field))


_RENAMES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^max_completion_tokens\b|^max_tokens\b"), "max_output_tokens"),
    (re.compile(r"^response_format\.json_schema\.schema\b"), "text.format.schema"),
    (re.compile(r"^response_format\.json_schema\b"), "text.format"),
    (re.compile(r"^response_format\b"), "text.format"),
    (re.compile(r"^messages(\.\d+)?(\.[\w.]+)?"), "input"),  # messages are not one-to-one with items
    (re.compile(r"^tools\.(\d+)\.function\b"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function\.name\b"), "tool_choice.name"),
]


def responses_param(param: str | None) -> str | None:
    if not param:
        return param
    for pattern, repl in _RENAMES:
        new = pattern.sub(repl, param, count=1)
        if new != param:
            return new
    return param


def renamed(err: ApiError) -> ApiError:
    """``err`` with its ``param`` (and the message's leading field name) in Responses terms."""
    new = responses_param(err.param)
    if new == err.param:
        return err
    message = err.message
    if err.param and message.startswith(err.param):
        message = new + message[len(err.param):]
    return ApiError(err.status, message, param=new, code=err.code, type=err.type, retry_after=err.retry_after)


def to_chat_request(req: ResponsesRequest) -> ResponsesChatRequest:
    """400 naming the Responses field at fault."""
    try:
        body = _chat_body(req)
    except InvalidParam as e:
        raise ApiError(400, str(e), param=e.field) from None
    try:
        return ResponsesChatRequest.model_validate(body)
    except ValidationError as e:
        err = validation_error_body(e)["error"]
        raise renamed(ApiError(400, err["message"], param=err["param"], code=err["code"])) from None


def _chat_body(req: ResponsesRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "stream": req.stream,
                            "n": 1, "user": req.user}
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        body["max_completion_tokens"] = req.max_output_tokens
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        body["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items()
                                                                          if v is not None}}
    tools = req.function_tools()
    if tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    return body


def _tool_choice(value: Any) -> Any:
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"} \
            and isinstance(value["name"], str):
        return {"type": "function", "function": {"name": value["name"]}}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind is not None and kind != "function":
        raise InvalidParam("tool_choice", f"tool_choice: {kind!r} (built-in tools, allowed_tools, MCP) is not "
                                          "supported by shoal")
    raise InvalidParam("tool_choice", "tool_choice: must be 'none', 'auto', 'required' or "
                                      f'{{"type": "function", "name": ...}}, got {value!r}'[:300])


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    for item in req.items():
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out
