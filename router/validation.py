"""From an HTTP request to checked values, refused at the edge with a 4xx naming the field.

The order an endpoint follows: :func:`read_request` (size limit 413, JSON and schema 400) ->
:func:`check_model` (400 on ``model``) -> :func:`run_tokenizer` (tokenizer and chat-template failures are the caller's:
400) -> :func:`check_limits` and :func:`resolve_max_tokens` (the config's and the context length's
limits) -> :func:`sampling_params` (``SamplingParams``' own checks, 400).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from shoal.workers.engine.sampling_params import SamplingParams

from .config import RouterConfig
from .context import RouterContext
from .errors import ApiError, bad_value
from .openai_protocol import validation_error_body
from .tokenization import Prompt

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# -- the body -------------------------------------------------------------------------------------------


async def read_request(request: Request, model: type[M], limit: int) -> M:
    """The body, at most ``limit`` bytes, parsed as JSON and validated as ``model``."""
    return _parse(model, await _read_json(request, limit))


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, more than the limit of {limit} "
                            "(max_body_bytes)", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than the limit of {limit} bytes (max_body_bytes)",
                           code="request_too_large")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        body = validation_error_body(e)["error"]
        raise ApiError(400, body["message"], param=body["param"]) from None


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
                 logprobs_field: str) -> None:
    if n * num_prompts > config.max_n:
        what = "n" if num_prompts == 1 else f"n times the number of prompts ({num_prompts})"
        raise ApiError(400, f"n: {what} must be <= {config.max_n} (max_n), got {n * num_prompts}", param="n")
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


def sampling_params(build: Callable[[int], SamplingParams], max_tokens: int) -> SamplingParams:
    """``build(max_tokens)``: the request's own ``to_sampling_params``, whose ValueErrors are a 400."""
    try:
        return build(max_tokens)
    except ValueError as e:
        raise bad_value(e) from None
