"""OpenAI-compatible request and response bodies (``/v1/completions``, ``/v1/chat/completions``, ...).

Requests are checked in two layers, each rule written once: the API's own limits here (OpenAI's
temperature range, the shape of ``prompt`` and ``messages``, field combinations), and every sampling
rule by ``SamplingParams`` itself (``_SamplingRequest.to_sampling_params``), whose ``InvalidParam``
names the field as data. A violation becomes an HTTP 400 whose ``param`` names the field (see
:func:`validation_error_body`).

Nothing is silently ignored: a field shoal does not know is a 400, as OpenAI answers, and a field of
the OpenAI or vLLM API that shoal does not implement (beam search, logit_bias, audio, ...) is a
400 naming it unless its value asks for nothing (``null``, ``false``, ``{"type": "text"}``: clients
that send defaults keep working). Tools are read here (``tools``, ``tool_choice``,
``parallel_tool_calls``) and planned in ``router/tools``; the legacy ``functions`` / ``function_call``
stay refused by name. Structured output has four spellings, all accepted and each refused
in combination with another (:meth:`_SamplingRequest.structured_constraint`). vLLM's extra sampling
fields (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ...) are accepted
at the top level, which is where the official client's ``extra_body`` puts them.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from shoal.workers.engine.sampling_params import InvalidParam, SamplingParams
from shoal.workers.engine.structured_outputs import StructuredOutputs, check

from .tools.request import TOOL_CHOICE_SCHEMA, ChatTool, parse_tool_choice

# -- errors ---------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error_body(err: ValidationError) -> dict:
    """The first pydantic error as an OpenAI 400 body: ``param`` is the field's dotted path.

    The path comes from pydantic's ``loc``, and for a whole-model check from the ``InvalidParam`` it
    raised (its ``field``): never from the message text.
    """
    errors = err.errors(include_url=False)
    # A union (str | list[part]) reports one error per member; our own checks say the most.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    # Unions add the member type to the path ("content.str", "content.list[...]"): keep field names
    # and list indices only.
    loc = [str(p) for p in first.get("loc", ())
           if isinstance(p, int) or (str(p).isidentifier() and str(p) not in _TYPE_NAMES)]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidParam):  # our own check: its message already names the field
        param = ".".join([*loc, cause.field])
        msg = str(cause)
        if loc and msg.startswith(cause.field):  # a nested model's check: name the field by its whole path
            msg = param + msg[len(cause.field):]
        return error_body(msg, param=param)
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return error_body(f"{param}: unrecognized request argument; shoal refuses fields it does not know "
                          "(the accepted ones are in /openapi.json)", param=param, code="unknown_field")
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if param is None:
        return error_body(msg)
    return error_body(msg if msg.startswith(param) else f"{param}: {msg}", param=param)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


# -- requests -------------------------------------------------------------------------------------------


def _inert(value: Any, allowed: tuple) -> bool:
    """``value`` is one of ``allowed`` (None always is); True and 1 are told apart."""
    return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


class _Request(BaseModel):
    """A request body: unknown fields are refused, and so are the ``unsupported`` ones unless inert.

    ``unsupported``: field -> (the values that ask for nothing, what the field would need). An inert
    value is dropped before validation; any other is an ``InvalidParam`` naming the field.
    """

    model_config = ConfigDict(extra="forbid")
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.unsupported.keys() & data.keys():
            return data
        for name, (allowed, what) in cls.unsupported.items():
            if name in data and not _inert(data[name], allowed):
                raise InvalidParam(name, f"{name}: {what} is not supported by shoal")
        return {k: v for k, v in data.items() if k not in cls.unsupported}


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


_SAMPLING_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "guided_decoding_backend": ((), "guided_decoding_backend (shoal has one grammar engine, llguidance)"),
    "guided_whitespace_pattern": ((), "guided_whitespace_pattern"),
    "use_beam_search": ((False,), "beam search"),
    "length_penalty": ((1, 1.0), "length_penalty (beam search)"),
    "logits_processors": ((), "logits_processors"),
    "truncate_prompt_tokens": ((), "truncate_prompt_tokens"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids"),
    "cache_salt": ((), "cache_salt"),
    "kv_transfer_params": ((), "kv_transfer_params"),
    "store": ((False,), "store (stored completions)"),
    "metadata": (({},), "metadata (stored completions)"),
    "prediction": ((), "prediction (predicted outputs)"),
    "service_tier": (("auto", "default"), "service_tier"),
}


class JsonSchemaFormat(_Request):
    """``response_format.json_schema``. ``strict`` is accepted either way: the schema is always enforced."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise InvalidParam("json_schema", "json_schema: required with type 'json_schema', and only with it")
        return self


class StructuredOutputsParams(_Request):
    """vLLM's ``structured_outputs`` object: exactly one constraint."""

    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {
        "structural_tag": ((), "structural_tag"), "whitespace_pattern": ((), "whitespace_pattern"),
        "disable_fallback": ((False,), "disable_fallback (shoal has one grammar engine)"),
        "disable_any_whitespace": ((False,), "disable_any_whitespace (JSON is always compact)"),
        "disable_additional_properties": ((False,), "disable_additional_properties"),
    }

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")  # BaseModel has a json()
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions.

    The two name some things differently (``logprobs`` is a count in one and a flag in the other):
    ``requested_logprobs`` / ``requested_max_tokens`` give the values, ``*_field`` the names errors use.
    Sampling limits (top_p in (0, 1], penalties in [-2, 2], min_tokens <= max_tokens, ...) are
    ``SamplingParams``' own: :meth:`to_sampling_params` applies them.
    """

    logprobs_field: ClassVar[str]
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = _SAMPLING_UNSUPPORTED

    model: str | None = None
    n: int = 1
    temperature: float | None = Field(None, le=2)  # OpenAI's upper bound; SamplingParams checks >= 0
    top_p: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # the wire's int64
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = Field(None, le=2)
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    # token filters: OpenAI's logit_bias (token id string -> bias in [-100, 100]), vLLM's others
    logit_bias: dict[str, Any] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    # structured output (one of these at most); response_format is OpenAI's, the rest vLLM's
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_constraint(self) -> tuple[str, StructuredOutputs] | None:
        """(the field it is spelled as, the constraint) or None; ``InvalidParam`` naming the field
        when a second one is set or the first is malformed (not compiled: :meth:`to_sampling_params`)."""
        found = self._constraints()
        if not found:
            return None
        if len(found) > 1:
            raise InvalidParam(found[1][0], f"{found[1][0]}: only one structured-output constraint per request, "
                                            f"and {found[0][0]} is already set")
        name, build = found[0]
        try:
            return name, build()
        except InvalidParam as e:
            raise InvalidParam(name, e.renamed(name), e.reason) from None

    def _constraints(self) -> list[tuple[str, Any]]:
        """(field, builder) of every constraint the request spells."""
        found: list[tuple[str, Any]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", lambda: StructuredOutputs("json_object")))
        elif rf is not None and rf.type == "json_schema":
            found.append(("response_format.json_schema.schema",
                          lambda: StructuredOutputs.json_schema(rf.json_schema.schema_)))
        so = self.structured_outputs
        if so is not None:
            for key in ("json", "regex", "choice", "grammar", "json_object"):
                value = so.json_ if key == "json" else getattr(so, key)
                if value is not None and value is not False:
                    found.append((f"structured_outputs.{key}", _constraint(key, value)))
        for key in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{key}")
            if value is not None:
                found.append((f"guided_{key}", _constraint(key, value)))
        return found

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidParam("stream_options", "stream_options: only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """``stream_options.continuous_usage_stats`` with ``include_usage``: usage on every chunk (vLLM's)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    @abstractmethod
    def requested_logprobs(self) -> int | None:
        """Top-logprobs asked for, None for none (completions and chat spell it differently)."""

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens"

    @property
    def num_candidates(self) -> int:
        """Children per prompt (completions' best_of may ask for more than the n returned)."""
        return self.n

    def request_field(self, sampling_field: str) -> str:
        """The name this request gives a ``SamplingParams`` field (for the ``param`` of its errors)."""
        if sampling_field.startswith("structured_outputs."):
            try:
                spelled = self.structured_constraint()
            except InvalidParam:  # the error is about the spelling itself: it names its own field
                return sampling_field
            return spelled[0] if spelled is not None else sampling_field
        return {"max_tokens": self.max_tokens_field, "logprobs": self.logprobs_field}.get(sampling_field,
                                                                                        sampling_field)

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """The request's params (``n`` as asked; the router gives each child n = 1 and its own seed).

        Raises ``InvalidParam`` (``SamplingParams``' own checks, and a constraint the grammar engine
        cannot compile); its field is ``SamplingParams``' name: :meth:`request_field` gives this request's.
        """
        spelled = self.structured_constraint()
        structured = spelled[1] if spelled is not None else None
        if structured is not None:
            check(structured)
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop_list,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=self.requested_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured,
            logit_bias=self.logit_bias or (),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=tuple(self.bad_words or ()),
            prompt_logprobs=self.engine_prompt_logprobs,
        )

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes (completions' echo with logprobs needs them too)."""
        return self.prompt_logprobs


def _constraint(key: str, value: Any):
    """A builder of the ``StructuredOutputs`` of one vLLM-spelled constraint."""
    if key == "json":
        return lambda: StructuredOutputs.json_schema(value)
    if key == "json_object":
        return lambda: StructuredOutputs("json_object")
    if key == "choice":
        return lambda: StructuredOutputs("choice", choices=tuple(value))
    return lambda: StructuredOutputs(key, value)


_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
_PROMPT_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                            _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]}


class CompletionRequest(_SamplingRequest):
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_SAMPLING_UNSUPPORTED, "suffix": (("",), "suffix (insertion)")}

    # str | list[str] | list[int] | list[list[int]]; checked by _prompt_shape (pydantic's union
    # errors would name four branches instead of the field).
    prompt: Any = Field(json_schema_extra=_PROMPT_SCHEMA)
    logprobs: int | None = None
    logprobs_field: ClassVar[str] = "logprobs"
    echo: bool = False
    best_of: int | None = None  # candidates per prompt (>= n); the n with the highest cumulative logprob return

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v):
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if isinstance(v, list) and v:
            if all(isinstance(p, str) for p in v):
                if not all(v):
                    raise ValueError("prompt strings must not be empty")
                return v
            if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                return v
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in v):
                return v
        raise ValueError("prompt must be a non-empty string, list of strings, list of token ids, "
                         "or list of token-id lists")

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is None:
            return self
        if self.best_of < 1:
            raise InvalidParam("best_of", f"best_of: must be >= 1, got {self.best_of}")
        if self.best_of < self.n:
            raise InvalidParam("best_of", f"best_of: must be >= n ({self.n}), got {self.best_of}")
        if self.stream and self.best_of > 1:
            raise InvalidParam("best_of", "best_of: cannot be used with stream (the best candidates are known "
                                          "only once all have finished); use n")
        return self

    @property
    def num_candidates(self) -> int:
        """Children per prompt: best_of when set, else n."""
        return self.best_of or self.n

    @property
    def echo_logprobs(self) -> bool:
        """echo with logprobs: the echoed prompt tokens carry logprobs too (from prompt logprobs)."""
        return self.echo and self.logprobs is not None

    @property
    def engine_prompt_logprobs(self) -> int | None:
        if not self.echo_logprobs:
            return self.prompt_logprobs
        return max(self.logprobs, self.prompt_logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one entry per prompt (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs


class ChatContentPart(BaseModel):
    # Other keys of a part (image_url, cache_control, ...) are not refused one by one: any part that is
    # not text is refused whole by _text_only.
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported, got type {self.type!r}")
        return self


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, tool_call_id, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        out = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            out["content"] = "".join(part.text or "" for part in self.content)
        elif self.content is None:
            out["content"] = ""
        return out


# Template variables the router sets itself: chat_template_kwargs may not replace them.
_TEMPLATE_OWN = {"chat_template": "use the chat_template field", "messages": "they are the request's messages",
                 "add_generation_prompt": "use the add_generation_prompt field", "tools": "use the tools field"}


def check_template_kwargs(v: dict[str, Any] | None) -> dict[str, Any] | None:
    for key in (v or {}).keys() & _TEMPLATE_OWN.keys():
        raise InvalidParam(key, f"{key}: not a chat_template_kwargs key ({_TEMPLATE_OWN[key]})")
    return v


_LEGACY = "the legacy function-calling field (use tools and tool_choice)"


class ChatCompletionRequest(_SamplingRequest):
    unsupported: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_SAMPLING_UNSUPPORTED,
        "functions": (([],), f"functions, {_LEGACY},"),
        "function_call": (("none", "auto"), f"function_call, {_LEGACY},"),
        "audio": ((), "audio output"), "modalities": ((["text"],), "modalities other than ['text']"),
        "reasoning_effort": ((), "reasoning_effort"), "web_search_options": ((), "web search"),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    logprobs_field: ClassVar[str] = "top_logprobs"
    # vLLM extras for templates
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # the Jinja template to render this request with (vLLM's)
    chat_template_kwargs: dict[str, Any] | None = None
    # tool calling (router/tools)
    tools: list[ChatTool] | None = None
    tool_choice: Any = Field(None, json_schema_extra=TOOL_CHOICE_SCHEMA)
    parallel_tool_calls: bool | None = None
    _tool_constraint: StructuredOutputs | None = PrivateAttr(None)

    def force_tool_call(self, constraint: StructuredOutputs) -> None:
        """``tool_choice`` required or named: the call's grammar becomes the request's constraint."""
        self._tool_constraint = constraint

    def _constraints(self) -> list[tuple[str, Any]]:
        own = super()._constraints()
        if self._tool_constraint is None:
            return own
        spec = self._tool_constraint
        return [("tool_choice", lambda: spec), *own]

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_variables(cls, v):
        return check_template_kwargs(v)

    @model_validator(mode="after")
    def _checks(self):
        if self.tool_choice is not None:
            parse_tool_choice(self.tool_choice)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParam("top_logprobs", "top_logprobs: requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidParam("continue_final_message",
                               "continue_final_message: cannot be combined with add_generation_prompt")
        return self

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class TokenizeRequest(_Request):
    """vLLM's ``/tokenize`` body: a ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # rendered as a chat request's would be
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _own_variables(cls, v):
        return check_template_kwargs(v)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParam("prompt", "prompt: give exactly one of prompt and messages")
        for name in ("chat_template", "chat_template_kwargs"):
            if self.prompt is not None and getattr(self, name) is not None:
                raise InvalidParam(name, f"{name}: only with messages (a prompt is not rendered)")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# -- responses ------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob``: one token's entry in ``prompt_logprobs`` (keyed by its token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: one entry per prompt token, null for the first; present only when asked for
PromptLogprobs = list[dict[str, PromptLogprob] | None]


def _absent_unless_set():
    return Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = _absent_unless_set()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of an object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = _absent_unless_set()  # vLLM's place: the response (one prompt)


class ChatStreamChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role": "assistant"} first, then {"content": "..."} and/or {"tool_calls": [...]}
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = _absent_unless_set()  # once, on the first chunk that has them


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shoal"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
