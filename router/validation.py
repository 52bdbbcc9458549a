"""From an HTTP request to checked values, refused at the edge with a 4xx naming the field.

The order an endpoint follows: :func:`read_request` (body timeout 408, size limit 413, nesting depth,
JSON and schema 400) -> :func:`check_model` (400 on ``model``) -> :func:`chat_tools` (chat: tools and
tool_choice, 400 naming the field) -> :func:`sampling_params` (``SamplingParams``' own checks, 400
naming the field) -> :func:`run_tokenizer` (tokenizer and chat-template failures are the
caller's: 400) -> :func:`check_limits` and :func:`resolve_max_tokens` (the config's and the context
length's limits) -> :func:`child_params` (the resolved max_tokens, checked by ``SamplingParams`` again).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import Any, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from shoal.workers.engine.sampling_params import SamplingParams

from .chat_template import check_chat_template
from .config import RouterConfig
from .context import RouterContext
from .errors import ApiError, bad_value
from .openai_protocol import ChatCompletionRequest, TokenizeRequest, _SamplingRequest, validation_error_body
from .tokenization import Prompt, RouterTokenizer
from .tools.chat import ChatTools, prepare_chat_tools

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# -- the body -------------------------------------------------------------------------------------------


async def read_request(request: Request, model: type[M], config: RouterConfig) -> M:
    """The body (within ``body_timeout_s``, at most ``max_body_bytes``, nested at most ``max_json_depth``
    deep), parsed as JSON and validated as ``model``."""
    body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
    check_depth(body, config.max_json_depth)
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(body):  # rare: only then walk the body
        check_unicode(data)
    return _parse(model, data)


# A \uD800-\uDFFF escape. Paired, two of them are one character; alone, it makes a string that is not
# Unicode text: the tokenizer refuses it with a TypeError and UTF-8 cannot carry it (not even back in
# an error message), so it is a 400 here.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_unicode(value: Any, path: tuple = ()) -> None:
    """400 naming the field when a string (or an object key) of ``value`` holds a lone surrogate.
    Recursion is bounded: the body passed :func:`check_depth`."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            param = ".".join(map(str, path)) or None
            where = f"{param}: " if param else ""
            raise ApiError(400, f"{where}the string holds a lone UTF-16 surrogate "
                                f"(\\u{ord(value[e.start]):04x} at {e.start}): not valid Unicode text",
                           param=param, code="invalid_unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, (*path, i))


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body. A client that stops sending (a Content-Length it never fills) gets 408 after
    ``timeout_s`` and the connection is closed: it cannot hold a connection and a task forever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {limit} "
                            "(max_body_bytes)", code="request_too_large", close=True)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body is larger than the limit of {limit} bytes "
                                        "(max_body_bytes)", code="request_too_large", close=True)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s} s (body_timeout_s): "
                            f"{len(body)} bytes came", code="request_timeout", close=True) from None
    return bytes(body)


# A JSON string (escapes included): its brackets are text, not nesting.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = [0] * 256
for _b in b"[{":
    _DEPTH_STEP[_b] = 1
for _b in b"]}":
    _DEPTH_STEP[_b] = -1


def check_depth(body: bytes, limit: int) -> None:
    """400 when arrays/objects nest deeper than ``limit``, found before parsing: the parser (and
    pydantic after it) recurse once per level, and 10,000 levels are a RecursionError, not an answer.

    Linear, in C (regex, translate, accumulate): the strings go, the brackets stay, their running sum
    is the depth. Broken JSON may miscount here; the parser then names the real fault.
    """
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:  # cannot nest deeper than it has brackets
        return
    depth = max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)
    if depth > limit:
        raise ApiError(400, f"the request body nests {depth} levels deep, more than the limit of {limit} "
                            "(max_json_depth)", code="json_too_deep")


def _parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        body = validation_error_body(e)["error"]
        raise ApiError(400, body["message"], param=body["param"], code=body["code"]) from None


# -- model, prompts, limits -----------------------------------------------------------------------------


def check_model(ctx: RouterContext, model: str | None) -> str:
    """The model name to answer with; 400 on ``model`` when the request names one this router does not serve.

    A bad field of the body, like any other: refused at the edge before anything reaches a worker.
    """
    names = ctx.model_names()
    if model and names and model not in names:
        raise ApiError(400, f"model: the model `{model}` does not exist; this server serves {names}",
                       param="model", code="model_not_found")
    return model or (names[0] if names else "unknown")


# Below this many characters tokenizing takes less than a hop to a thread and back (which, with the
# GIL's switch interval, costs milliseconds on a busy machine): do it on the event loop.
INLINE_TOKENIZE_CHARS = 8192


def _text_size(args: tuple) -> int:
    return sum(len(a) if isinstance(a, str) else sum(len(str(x)) for x in a)
               if isinstance(a, (list, tuple)) else 0 for a in args)


async def run_tokenizer(fn: Callable[..., T], *args: Any, field: str, prefix: str = "",
                        errors: type[Exception] = Exception) -> T:
    """``fn(*args)``, off the event loop when the text is large; ``errors`` become a 400 on ``field``."""
    try:
        if _text_size(args) <= INLINE_TOKENIZE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)
    except errors as e:
        raise ApiError(400, f"{prefix}{e}", param=field) from None


def check_limits(config: RouterConfig, n: int, num_prompts: int, logprobs: int | None, stop: tuple[str, ...],
                 logprobs_field: str, n_field: str = "n", prompt_logprobs: int | None = None) -> None:
    """``n``: the children per prompt (``n_field`` names it: ``best_of`` when that asks for more)."""
    if n * num_prompts > config.max_n:
        what = n_field if num_prompts == 1 else f"{n_field} times the number of prompts ({num_prompts})"
        raise ApiError(400, f"{n_field}: {what} must be <= {config.max_n} (max_n), got {n * num_prompts}",
                       param=n_field)
    if prompt_logprobs is not None and prompt_logprobs > config.max_logprobs:
        raise ApiError(400, f"prompt_logprobs: must be <= {config.max_logprobs}, got {prompt_logprobs}",
                       param="prompt_logprobs")
    if logprobs is not None and logprobs > config.max_logprobs:
        raise ApiError(400, f"{logprobs_field}: must be <= {config.max_logprobs}, got {logprobs}",
                       param=logprobs_field)
    if len(stop) > config.max_stop_sequences:
        raise ApiError(400, f"stop: at most {config.max_stop_sequences} stop sequences, got {len(stop)}",
                       param="stop")


def resolve_max_tokens(ctx: RouterContext, prompts: list[Prompt], requested: int | None, default: int | None,
                       field: str, max_field: str) -> int:
    """The children's max_tokens, after checking the prompt and the request against the limits.

    Unrequested, it is all the room the longest prompt leaves (capped at ``default``); requested, it
    must fit that room. The context length is the smallest of the known workers' (503 without any).
    """
    max_len = ctx.pool.max_model_len()
    if max_len is None:
        raise ctx.no_worker_error()
    longest = max(len(p.token_ids) for p in prompts)
    limit, why = _prompt_limit(ctx.config, max_len)
    if longest > limit:
        raise ApiError(400, f"{field}: the prompt has {longest} tokens, more than the limit of {limit} "
                            f"({why})", param=field, code="context_length_exceeded")
    room = max_len - longest
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(400, f"{max_field}: {requested} tokens requested, but the prompt takes {longest} of "
                            f"the model's {max_len}-token context, leaving {room}", param=max_field,
                       code="context_length_exceeded")
    return requested


def _prompt_limit(config: RouterConfig, max_len: int) -> tuple[int, str]:
    """The longest prompt allowed, and the limit's name for the error message."""
    limit, why = max_len - 1, f"the model's context length ({max_len}) less one generated token"
    if config.max_prompt_tokens is not None and config.max_prompt_tokens < limit:
        limit, why = config.max_prompt_tokens, "max_prompt_tokens"
    return limit, why


def chat_tools(req: ChatCompletionRequest | TokenizeRequest, configured_parser: str | None,
               chat_template: str | None) -> ChatTools:
    """The request's tools planned (a forced call compiled), and the messages as the template's input;
    a 400 naming the field (``tool_choice``, ``tools.<i>.function.parameters``, ``messages.<i>.tool_calls``).
    ``/tokenize`` renders its tools as a chat request with ``tool_choice: "none"`` would."""
    chat = isinstance(req, ChatCompletionRequest)
    try:
        return prepare_chat_tools([m.for_template() for m in req.messages], req.tools,
                                  req.tool_choice if chat else "none", req.parallel_tool_calls if chat else None,
                                  configured_parser, chat_template)
    except ValueError as e:
        raise bad_value(e) from None


def request_chat_template(req: ChatCompletionRequest | TokenizeRequest, tok: RouterTokenizer) -> str | None:
    """The template to render ``req`` with: its own ``chat_template`` (compiled here: a 400 naming the
    field with Jinja's error), else the router's (``--chat-template``, else the tokenizer's)."""
    if req.chat_template is None:
        return tok.tokenizer.chat_template
    try:
        check_chat_template(req.chat_template)
    except ValueError as e:
        raise ApiError(400, f"chat_template: {e}", param="chat_template") from None
    return req.chat_template


def sampling_params(req: _SamplingRequest) -> SamplingParams:
    """The request's ``SamplingParams`` with the max_tokens it asked for (None: not yet known), checked
    before the prompt is tokenized; its ``InvalidParam`` is a 400 naming the request's field."""
    try:
        return req.to_sampling_params(req.requested_max_tokens)
    except ValueError as e:
        raise bad_value(e, req.request_field) from None


def token_filters(req: _SamplingRequest, params: SamplingParams, tok: RouterTokenizer) -> SamplingParams:
    """``params`` with its token filters checked against the vocabulary (400 naming the field) and its
    bad words tokenized here, at the edge, as prompts are: workers get token ids."""
    try:
        params.check_vocab(tok.vocab_size)
    except ValueError as e:
        raise bad_value(e, req.request_field) from None
    if not params.bad_words:
        return params
    encode = lambda text: tok.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    try:
        resolved = params.with_bad_words_resolved(encode)
    except ValueError as e:
        raise bad_value(e, req.request_field) from None
    bad = next((t for w in resolved.bad_words_token_ids for t in w if t >= tok.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"bad_words: token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                       param="bad_words")
    return resolved


def child_params(req: _SamplingRequest, params: SamplingParams, max_tokens: int) -> SamplingParams:
    """One child's params: n = 1 (the router fans out) and the resolved max_tokens, checked again."""
    try:
        return params.replace(n=1, max_tokens=max_tokens)
    except ValueError as e:
        raise bad_value(e, req.request_field) from None
