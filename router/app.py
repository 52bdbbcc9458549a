"""The router's OpenAI-compatible HTTP API: ``create_app(config, pool, tokenizer) -> FastAPI``.

One request's path: read the body (size-limited) -> validate (400 naming the field) -> tokenize and
apply the chat template once -> admission (concurrency slot, bounded FIFO wait, else 429) -> place
each prompt with the pool's policy (503 when no worker is healthy) -> one child ``GenerateRequest``
per choice (``n`` children of a prompt go to the same worker, which shares their prefix blocks) ->
stream ``TokenDelta``s, detokenize and apply stop strings here (a hit aborts the child on its
worker) -> answer as JSON or SSE.

Failure rules (the design's invariants): a worker failing before a choice's first token is retried
once on the next ranked worker; after it, the stream ends with an SSE error event. A client that goes
away, a deadline, or a stop string aborts the child on the worker. Nothing waits without a bound:
admission has a queue timeout, the whole request a deadline, worker aborts a timeout.

This module wires the app and holds the endpoints; each step lives in its own module:

    context      what the endpoints share (config, pool, tokenizer, metrics, clock, admission)
    validation   body, model, prompts and limits -> checked values (4xx naming the field)
    admission    concurrency slots and the bounded FIFO line (429 / 503)
    generation   placement, fan-out of the children, retry before the first token, deadline
    choice       one child's state: detokenization and stop strings
    responses    OpenAI bodies and chunks built from the choices
    responses_api  /v1/responses: its body, the chat request it maps to, its response and events
    respond      admit -> start -> JSON or SSE, with the cleanup run exactly once
    streaming    the SSE body, and a response that notices a client leaving
    errors       ``ApiError`` and the handlers that give every error the OpenAI shape
    middleware   CORS, request id and access log, request counts, the API key (outermost first)
    openapi      the request bodies in /openapi.json (bodies are read by validation, not by FastAPI)
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.middleware.cors import CORSMiddleware

from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.tokenizer import Tokenizer

from .config import RouterConfig
from .context import RouterContext
from .errors import ApiError, add_error_handlers
from .generation import Generation
from .chat_template import load_chat_template
from .cold_start import OnDemand
from .metrics import CONTENT_TYPE, RouterMetrics
from .middleware import CountRequests, RequestContext, RequireApiKey, access_record
from .openapi import declare_request_bodies
from .openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                              ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from .respond import hold_for_worker, respond
from .responses import ChatBuilder, CompletionBuilder
from .responses_api.mapping import renamed, to_chat_request
from .responses_api.output import ResponsesBuilder
from .responses_api.protocol import ResponsesRequest
from .tokenization import Prompt, RouterTokenizer
from .tools.chat import ChatTools
from .validation import (chat_tools, check_limits, check_model, child_params, read_request, request_chat_template,
                         resolve_max_tokens, run_tokenizer, sampling_params, token_filters)

# Paths that answer without the API key: probes and scrapers carry none, and the schema describes only.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
from .worker_pool import WorkerPool


def shoal_version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def create_app(config: RouterConfig, pool: WorkerPool, tokenizer: Tokenizer | RouterTokenizer, *,
               metrics: RouterMetrics | None = None, clock: Callable[[], float] = time.monotonic,
               on_demand: OnDemand | None = None) -> FastAPI:
    """The router app. Its lifespan starts the pool's polling and closes the pool (and so the worker
    handles) at shutdown; the pool must not be shared with another app. ``on_demand(bool)``: told
    while requests are held for a worker to start (``config.cold_start_wait_s``, ``cold_start.py``)."""
    tok = tokenizer if isinstance(tokenizer, RouterTokenizer) else RouterTokenizer(tokenizer)
    if config.chat_template is not None:  # checked by RouterConfig: it loads and compiles
        tok = tok.with_chat_template(load_chat_template(config.chat_template))
    ctx = RouterContext(config, pool, tok, metrics or RouterMetrics(), clock, on_demand)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="shoal router", lifespan=lifespan)
    app.state.ctx = ctx
    # add_middleware puts each one outside the ones before it: the key check innermost, CORS outermost
    # (a browser's preflight carries no key; a 401 still gets CORS headers, an id and a log line).
    if config.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=config.api_key, open_paths=OPEN_PATHS)
    app.add_middleware(CountRequests, metrics=ctx.metrics)
    app.add_middleware(RequestContext, log_format=config.access_log)
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                       allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers),
                       allow_credentials=config.allow_credentials, expose_headers=["X-Request-Id"])
    add_error_handlers(app)
    _add_generation_routes(app, ctx)
    _add_tokenizer_routes(app, ctx)
    _add_status_routes(app, ctx)
    declare_request_bodies(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                                 "/v1/responses": ResponsesRequest,
                                 "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})
    return app


def _add_generation_routes(app: FastAPI, ctx: RouterContext) -> None:
    cfg, tok = ctx.config, ctx.tok

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest, cfg)
        await hold_for_worker(request, ctx)  # a pool scaled to zero: wait while one starts
        model = check_model(ctx, req.model)
        params = sampling_params(req)
        prompts = await run_tokenizer(tok.encode_completion_prompts, req.prompts(), field="prompt",
                                      errors=ValueError)
        gen = _generation(ctx, request, req, params, "completions", prompts, "prompt",
                          cfg.default_completion_max_tokens)
        builder = CompletionBuilder(gen, model, tok, req.echo, req.logprobs, req.prompt_logprobs,
                                    continuous_usage=req.continuous_usage)
        return await respond(request, ctx, gen, builder, req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_request(request, ChatCompletionRequest, cfg)
        await hold_for_worker(request, ctx)
        model = check_model(ctx, req.model)
        gen, tools = await _chat_generation(ctx, request, req, "chat_completions")
        builder = ChatBuilder(gen, model, tok, req.prompt_logprobs, tools.plan, continuous_usage=req.continuous_usage)
        return await respond(request, ctx, gen, builder, req.stream, req.include_usage)

    @app.post("/v1/responses")
    async def responses(request: Request):
        """OpenAI's Responses API, served as the chat request it maps to (``responses_api``)."""
        req = await read_request(request, ResponsesRequest, cfg)
        await hold_for_worker(request, ctx)
        model = check_model(ctx, req.model)
        try:
            chat = to_chat_request(req)
            gen, tools = await _chat_generation(ctx, request, chat, "responses")
        except ApiError as e:  # the chat machinery names chat fields
            raise renamed(e) from None
        return await respond(request, ctx, gen, ResponsesBuilder(gen, model, req, tools.plan), req.stream, False)


async def _chat_generation(ctx: RouterContext, request: Request, req: ChatCompletionRequest,
                           endpoint: str) -> tuple[Generation, ChatTools]:
    """A chat request's tools planned, its sampling checked, its messages rendered and tokenized."""
    cfg, tok = ctx.config, ctx.tok
    template = request_chat_template(req, tok)
    tools = chat_tools(req, cfg.tool_call_parser, template)
    if tools.constraint is not None:
        req.force_tool_call(tools.constraint)
    params = sampling_params(req)
    # Template errors (raise_exception, bad roles) are the caller's.
    kwargs = {**(req.chat_template_kwargs or {}), **tools.template_kwargs, "chat_template": template}
    prompt = await run_tokenizer(tok.encode_chat, tools.messages, req.add_generation_prompt,
                                 req.continue_final_message, kwargs, field="messages",
                                 prefix="messages: the chat template failed: ")
    return _generation(ctx, request, req, params, endpoint, [prompt], "messages", None), tools


def _generation(ctx: RouterContext, request: Request, req: CompletionRequest | ChatCompletionRequest,
                params: SamplingParams, endpoint: str, prompts: list[Prompt], prompt_field: str,
                default_max_tokens: int | None) -> Generation:
    """Check ``req`` against the limits, then its children: ``n`` per prompt, one sampling setup.

    The ``x-session-id`` header (else the OpenAI ``user`` field) keys session-affine placement. The
    request id (``X-Request-Id``) prefixes the children's ids; a client's own id may repeat, so it gets
    a unique suffix (a worker refuses a request id already in use).
    """
    n_field = "best_of" if req.num_candidates > req.n else "n"
    check_limits(ctx.config, req.num_candidates, len(prompts), req.requested_logprobs, req.stop_list,
                 req.logprobs_field, n_field, req.prompt_logprobs)
    params = token_filters(req, params, ctx.tok)
    max_tokens = resolve_max_tokens(ctx, prompts, req.requested_max_tokens, default_max_tokens, prompt_field,
                                    req.max_tokens_field)
    params = child_params(req, params, max_tokens)
    session_key = request.headers.get("x-session-id") or req.user
    record = access_record(request.scope)
    request_id = None
    if record is not None:
        request_id = f"{record.request_id}-{uuid.uuid4().hex[:8]}" if record.from_client else record.request_id
    gen = Generation(ctx, endpoint, prompts, params, req.n, session_key, req.priority, request_id=request_id,
                     best_of=req.num_candidates)
    if record is not None:
        def usage() -> tuple[int, int]:  # read when the access line is written: final for a stream too
            u = gen.usage()
            return u.prompt_tokens, u.completion_tokens
        record.usage = usage
    return gen


def _add_tokenizer_routes(app: FastAPI, ctx: RouterContext) -> None:
    """vLLM's ``/tokenize`` and ``/detokenize``: the router's own tokenizer, no worker involved."""
    cfg, tok, pool = ctx.config, ctx.tok, ctx.pool

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await read_request(request, TokenizeRequest, cfg)
        check_model(ctx, req.model)
        field = "messages" if req.messages else "prompt"
        if req.messages is not None:
            template = request_chat_template(req, tok)
            tools = chat_tools(req, cfg.tool_call_parser, template)
            kwargs = {**(req.chat_template_kwargs or {}), **tools.template_kwargs, "chat_template": template}
            prompt = await run_tokenizer(tok.encode_chat, tools.messages, req.add_generation_prompt, False,
                                         kwargs, field=field, prefix=f"{field}: ")
            ids = list(prompt.token_ids)
        else:
            ids = await run_tokenizer(tok.tokenizer.encode, req.prompt, req.add_special_tokens, field=field,
                                      prefix=f"{field}: ")
        return TokenizeResponse(count=len(ids), max_model_len=pool.max_model_len(), tokens=ids,
                                token_strs=tok.token_strs(ids) if req.return_token_strs else None).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await read_request(request, DetokenizeRequest, cfg)
        check_model(ctx, req.model)
        bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"tokens: token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                           param="tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False)).model_dump()


def _add_status_routes(app: FastAPI, ctx: RouterContext) -> None:
    pool = ctx.pool

    @app.get("/v1/models")
    async def models():
        max_len = pool.max_model_len()
        cards = [ModelCard(id=name, max_model_len=max_len) for name in ctx.model_names()]
        return ModelList(data=cards).model_dump()

    @app.get("/version")
    async def version_():
        return {"version": shoal_version()}

    @app.get("/health")  # liveness: the process answers (RouterHost serves it from its first moment)
    async def health():
        return {"status": "ok"}

    @app.get("/ready")  # readiness: can serve now (a load balancer / Kubernetes sends traffic only then)
    async def ready():
        if ctx.phase != "serving":  # the host is still starting, or draining
            return ctx.unavailable(f"the router is {ctx.phase}", code=f"router_{ctx.phase}").response()
        healthy = sum(1 for s in pool.states() if s.healthy)
        if not pool.has_healthy() and ctx.config.cold_start_wait_s > 0:  # scaled to zero: requests wait
            return {"status": "cold", "healthy_workers": healthy, "workers": len(pool)}
        if not pool.has_healthy():  # prefill workers alone cannot serve a request
            return ctx.no_worker_error().response()
        return {"status": "ready", "healthy_workers": healthy, "workers": len(pool)}

    @app.get("/metrics")
    async def metrics():
        ctx.metrics.observe_pool(pool)
        workers = await ctx.metrics.render_workers(pool.states())  # each worker's series, worker="<id>"
        return Response(ctx.metrics.render() + workers, media_type=CONTENT_TYPE)
