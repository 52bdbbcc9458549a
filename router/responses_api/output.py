"""The Responses API's answer built from a chat ``Generation``: the ``response`` object, and for a
stream the event sequence the ``openai`` SDK parses (each event ``event: <type>`` + ``data:``, with a
``sequence_number``; no ``[DONE]``).

    response.created, response.in_progress
    per output item, in order:
      message:        output_item.added, content_part.added, output_text.delta ..., output_text.done,
                      content_part.done, output_item.done
      function_call:  output_item.added, function_call_arguments.delta ..., function_call_arguments.done,
                      output_item.done
    response.completed (or response.incomplete: max_output_tokens reached)

Text and calls come from the chat builder's tool parsing (``ToolCallOutput``): content becomes a
``message`` item with one ``output_text`` part, each call a ``function_call`` item whose ``call_id``
is the chat call's id. An item closes when the next begins, so items never interleave.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from ..choice import Event
from ..streaming import NamedEvent
from ..tools.output import ToolCallOutput, whole_message
from ..tools.request import ToolPlan
from .protocol import ResponsesRequest

if TYPE_CHECKING:
    from ..generation import Generation


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"id": item_id or _item_id("msg"), "type": "message", "status": status, "role": "assistant",
            "content": [output_text_part(text)]}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict:
    return {"id": item_id or _item_id("fc"), "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


class ResponsesBuilder:
    """One answer's id, time, output items and (streaming) events; a ``ResponseBuilder`` for ``respond``."""

    ends_with_done = False  # the Responses stream ends with response.completed, not [DONE]

    def __init__(self, gen: Generation, model: str, req: ResponsesRequest, tools: ToolPlan | None) -> None:
        self.gen, self.model, self.req = gen, model, req
        self.tools = tools if tools is not None and tools.parses else None
        self.id = f"resp_{gen.id}"
        self.created_at = int(time.time())
        self._seq = 0
        self._items: list[dict] = []  # the stream's output items so far
        self._open: dict | None = None  # the item receiving text or arguments
        self._calls: dict[int, dict] = {}  # chat call index -> its function_call item
        self._parser: ToolCallOutput | None = None
        self._finish_reason: str | None = None

    # -- the whole response ---------------------------------------------------------------------

    def response(self) -> dict:
        (_, c), = self.gen.final_choices()
        items: list[dict] = []
        if self.tools is None:
            text, calls = c.text, []
        else:
            text, calls = whole_message(self._tool_output(), c.text)
        if text:
            items.append(message_item(text))
        items += [function_call_item(t["id"], t["function"]["name"], t["function"]["arguments"]) for t in calls]
        if not items:
            items.append(message_item(""))
        return self._response(self._status(c.finish_reason), items)

    def _status(self, finish_reason: str | None) -> str:
        return "incomplete" if finish_reason == "length" else "completed"

    def _response(self, status: str, items: list[dict]) -> dict:
        if status == "incomplete" and items:
            items[-1] = {**items[-1], "status": "incomplete"}
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": dict(req.metadata or {}), "model": self.model, "output": items,
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": None, "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
            "tools": list(req.tools or []), "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled", "usage": self._usage() if status != "in_progress" else None,
            "user": req.user,
        }

    def _usage(self) -> dict:
        u = self.gen.usage()
        cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else 0
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens}

    def _tool_output(self) -> ToolCallOutput:
        return ToolCallOutput(self.tools.parser(self.tools.names), parallel=self.tools.parallel)

    # -- the stream -----------------------------------------------------------------------------

    def _event(self, type_: str, **data: Any) -> NamedEvent:
        ev = NamedEvent(type_, {"type": type_, "sequence_number": self._seq, **data})
        self._seq += 1
        return ev

    def start_chunks(self) -> list[NamedEvent]:
        shell = self._response("in_progress", [])
        return [self._event("response.created", response=shell),
                self._event("response.in_progress", response=shell)]

    def event_chunk(self, ev: Event) -> list[NamedEvent]:
        out: list[NamedEvent] = []
        if self.tools is None:
            if ev.text:
                out += self._text(ev.text)
        else:
            if self._parser is None:
                self._parser = self._tool_output()
            delta = self._parser.delta(ev.text, ev.finished)
            if delta.get("content"):
                out += self._text(delta["content"])
            for call in delta.get("tool_calls", []):
                out += self._call(call)
        if ev.finished:
            self._finish_reason = ev.choice.finish_reason
        return out

    def end_chunks(self, include_usage: bool) -> list[NamedEvent]:
        status = self._status(self._finish_reason)
        out: list[NamedEvent] = []
        if not self._items:
            out += self._text("")
        if status == "incomplete" and self._open is not None:
            self._open["status"] = "incomplete"
        out += self._close()
        final = self._response(status, [dict(i) for i in self._items])
        return [*out, self._event(f"response.{status}", response=final)]

    def error_chunks(self, body: dict) -> list[NamedEvent]:
        err = body.get("error", {})
        # the fields of OpenAI's error event, and ``error`` itself: the SDK raises APIError on it
        return [self._event("error", code=err.get("code") or err.get("type"), message=err.get("message"),
                            param=err.get("param"), error=err)]

    def _text(self, text: str) -> list[NamedEvent]:
        out: list[NamedEvent] = []
        item = self._open
        if item is None or item["type"] != "message":
            out += self._close()
            item = self._open = message_item("", status="in_progress")
            self._items.append(item)
            added = {**item, "content": []}
            out.append(self._event("response.output_item.added", output_index=self._index(), item=added))
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                                   content_index=0, part=output_text_part("")))
        if text:
            item["content"][0]["text"] += text
            out.append(self._event("response.output_text.delta", item_id=item["id"], output_index=self._index(),
                                   content_index=0, delta=text, logprobs=[]))
        return out

    def _call(self, call: dict) -> list[NamedEvent]:
        out: list[NamedEvent] = []
        fn = call.get("function", {})
        if "id" in call:  # the call's first piece
            out += self._close()
            item = self._open = function_call_item(call["id"], fn["name"], "", status="in_progress")
            self._calls[call["index"]] = item
            self._items.append(item)
            out.append(self._event("response.output_item.added", output_index=self._index(), item=dict(item)))
        item = self._calls[call["index"]]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self._items.index(item), delta=fn["arguments"]))
        return out

    def _close(self) -> list[NamedEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self._items.index(item)
        if item["status"] == "in_progress":
            item["status"] = "completed"
        out: list[NamedEvent] = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=dict(part)))
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
        out.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return out

    def _index(self) -> int:
        return len(self._items) - 1
