"""The ``/v1/responses`` request body, as OpenAI's Responses API spells it.

Like every shoal body (``openai_protocol._Request``): an unknown field is a 400, and a field of the
API that shoal does not implement (``previous_response_id``, ``store: true``, ``background``,
``reasoning``, ``include``, ``conversation``, built-in tools, ...) is a 400 naming it unless its value
asks for nothing. Inputs are text only: an ``input_image`` / ``input_file`` part is refused by its path.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shoal.workers.engine.sampling_params import InvalidParam

from ..openai_protocol import _Request, validation_error_body


class InputText(BaseModel):
    """A text part of an input message: ``input_text`` (and ``output_text`` of an earlier assistant turn)."""

    model_config = ConfigDict(extra="ignore")  # output_text's annotations / logprobs: nothing to render

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in ("input_text", "output_text", "text") or self.text is None:
            raise ValueError(f"only input_text / output_text content parts are supported, got type {self.type!r}")
        return self


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)


class FunctionCallItem(_Request):
    """A call the model made earlier (as ``output`` gave it), sent back with the history."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text or "" for p in self.output)


_ITEM_TYPES = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem}


class FunctionTool(_Request):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Request):
    """``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or a JSON schema (flat, not
    nested under ``json_schema`` as chat's ``response_format``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise InvalidParam("name" if self.name is None else "schema",
                               f"{'name' if self.name is None else 'schema'}: required with type 'json_schema'")
        if self.type != "json_schema" and (self.name, self.schema_, self.strict) != (None, None, None):
            raise InvalidParam("type", "type: name, schema and strict go with type 'json_schema' only")
        return self


class TextConfig(_Request):
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {"verbosity": (("medium",), "verbosity")}

    format: TextFormat | None = None


class StreamOptions(_Request):
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {
        "include_obfuscation": ((False,), "include_obfuscation (stream padding)")}


_FUNCTION_TOOL_SCHEMA = FunctionTool.model_json_schema()
_TOOL_CHOICE_SCHEMA = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "additionalProperties": False, "required": ["type", "name"],
     "properties": {"type": {"const": "function"}, "name": {"type": "string"}}}]}

_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "previous_response_id": ((), "previous_response_id (shoal stores no responses; send the history in input)"),
    "conversation": ((), "conversation (shoal stores no conversations; send the history in input)"),
    "store": ((False,), "store (shoal stores no responses; send store: false)"),
    "background": ((False,), "background"),
    "reasoning": (({},), "reasoning"),
    "include": (([],), "include"),
    "prompt": ((), "prompt (stored prompt templates)"),
    "prompt_cache_key": ((), "prompt_cache_key"),
    "prompt_cache_retention": ((), "prompt_cache_retention"),
    "safety_identifier": ((), "safety_identifier"),
    "service_tier": (("auto", "default"), "service_tier"),
    "truncation": (("disabled",), "truncation 'auto'"),
    "top_logprobs": ((0,), "top_logprobs"),
    "max_tool_calls": ((), "max_tool_calls"),
}


class ResponsesRequest(_Request):
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = _UNSUPPORTED

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]})
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(None, le=2)
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    # dicts, so that a built-in tool is refused by name (function_tools) rather than as a bad union
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"type": "array",
                                                                        "items": _FUNCTION_TOOL_SCHEMA})
    tool_choice: Any = Field(None, json_schema_extra=_TOOL_CHOICE_SCHEMA)
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input_shape(cls, v):
        if isinstance(v, str) and not v:
            raise ValueError("must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("must hold at least one item")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):  # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512
        if v is not None:
            if len(v) > 16:
                raise ValueError(f"at most 16 key-value pairs, got {len(v)}")
            for k, val in v.items():
                if len(k) > 64 or len(val) > 512:
                    raise ValueError(f"key {k[:64]!r}: keys are at most 64 characters, values at most 512")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidParam("stream_options", "stream_options: only allowed when stream is true")
        return self

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        """``input`` as typed items; ``InvalidParam`` naming ``input.<i>...``."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return [_item(i, raw) for i, raw in enumerate(self.input)]

    def function_tools(self) -> list[FunctionTool]:
        out = []
        for i, raw in enumerate(self.tools or []):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind != "function":
                raise InvalidParam(f"tools.{i}.type", f"tools.{i}.type: the built-in tool {kind!r} is not supported "
                                                      "by shoal (only function tools are)")
            out.append(_validated(FunctionTool, raw, f"tools.{i}"))
        return out


def _item(i: int, raw: Any):
    if not isinstance(raw, dict):
        raise InvalidParam(f"input.{i}", f"input.{i}: an input item must be an object")
    kind = raw.get("type", "message")  # an easy message ({"role", "content"}) has no type
    model = _ITEM_TYPES.get(kind)
    if model is None:
        raise InvalidParam(f"input.{i}.type", f"input.{i}.type: input items of type {kind!r} are not supported by "
                                              f"shoal (only {sorted(_ITEM_TYPES)})")
    return _validated(model, raw, f"input.{i}")


def _validated(model: type[BaseModel], raw: dict, path: str):
    """``raw`` as ``model``; ``InvalidParam`` naming the field by its path under ``path``."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = validation_error_body(e)["error"]
        param = f"{path}.{err['param']}" if err["param"] else path
        msg = err["message"]
        if err["param"] and msg.startswith(err["param"]):
            msg = msg[len(err["param"]):].lstrip(": ")
        raise InvalidParam(param, f"{param}: {msg}") from None
