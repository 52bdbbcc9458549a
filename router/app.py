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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.router.placement import PlacementRequest
from shoal.workers.engine.detokenizer import IncrementalDetokenizer
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import GenerateRequest, TokenLogprob
from shoal.workers.tokenizer import Tokenizer

from .config import RouterConfig
from .metrics import CONTENT_TYPE, RouterMetrics
from .openai_protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionResponse, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob,
                              CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                              CompletionResponse, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                              PromptTokensDetails, TokenizeRequest, TokenizeResponse, TopLogprob, Usage,
                              error_body, validation_error_body)
from .tokenization import Prompt, RouterTokenizer
from .worker_pool import WorkerPool, WorkerUnavailable

log = logging.getLogger(__name__)

_ABORT_TIMEOUT_S = 2.0  # an abort sent to a dying worker must not hold up the cleanup


# -- errors ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, as an OpenAI-style error body."""

    _TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
              429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self._TYPES.get(status, "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _param_of(message: str) -> str | None:
    """``SamplingParams`` / engine messages start with the field name: "max_tokens must be ..."."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if head.isidentifier() else None


# -- admission ------------------------------------------------------------------------------------------


class Admission:
    """At most ``max_running`` requests generate; up to ``max_waiting`` more wait in FIFO order.

    A full queue answers 429 at once; a wait longer than ``timeout_s`` answers 503. A released slot is
    handed straight to the oldest waiter, so late arrivals cannot overtake the queue.
    """

    def __init__(self, max_running: int, max_waiting: int, timeout_s: float, retry_after: int,
                 metrics: RouterMetrics) -> None:
        self.max_running, self.max_waiting, self.timeout_s = max_running, max_waiting, timeout_s
        self.retry_after, self.metrics = retry_after, metrics
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            self._publish()
            return
        if len(self._waiters) >= self.max_waiting:
            raise ApiError(429, f"the router is at its limit of {self.max_running} concurrent requests "
                                f"(max_concurrent_requests) with {len(self._waiters)} waiting "
                                f"(max_waiting_requests); retry later", code="too_many_requests",
                           retry_after=self.retry_after)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApiError(503, f"no concurrency slot freed within {self.timeout_s} s (queue_timeout_s)",
                           code="queue_timeout", retry_after=self.retry_after) from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
            self._publish()

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to this waiter; running stays the same
                self._publish()
                return
        self.running -= 1
        self._publish()

    def _publish(self) -> None:
        self.metrics.in_flight.set(self.running)
        self.metrics.queue_depth.set(len(self._waiters))


# -- one request's generation ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Choice:
    index: int
    prompt_index: int
    request: GenerateRequest
    detok: IncrementalDetokenizer
    text: str = ""  # emitted so far (stop strings never in it)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_at: float | None = None
    worker_id: str | None = None


@dataclass(frozen=True)
class _Event:
    choice: _Choice
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    error: ApiError | None = None


class _Generation:
    """All choices of one HTTP request (prompts x n), each a child request streamed from a worker.

    Children run as tasks and put ``_Event``s on one queue; every child ends with exactly one event
    that is ``finished`` or carries an ``error``. :meth:`cancel` stops them all, and each aborts its
    request on its worker on the way out.
    """

    def __init__(self, ctx: "_Context", endpoint: str, prompts: list[Prompt], params: SamplingParams, n: int,
                 session_key: str | None, priority: int) -> None:
        self.ctx, self.endpoint, self.prompts, self.params, self.n = ctx, endpoint, prompts, params, n
        self.session_key, self.priority = session_key, priority
        self.id = uuid.uuid4().hex
        self.arrival = ctx.clock()
        self.deadline = self.arrival + ctx.config.request_timeout_s
        self.choices: list[_Choice] = []
        self.first_token_at: float | None = None
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._placements: list[PlacementRequest] = []
        self._open = 0
        self._finished = False

    def start(self) -> None:
        """Place every prompt (all or none: 503 if any finds no worker), then start the children."""
        pool, ctx = self.ctx.pool, self.ctx
        placed = []
        for p, prompt in enumerate(self.prompts):
            preq = PlacementRequest(f"{self.id}-p{p}", prompt.token_ids, session_key=self.session_key)
            ranked = pool.rank(preq)
            if not ranked:
                raise ctx.no_worker_error()
            placed.append((preq, ranked))
        self._placements = [preq for preq, _ in placed]
        for p, (preq, ranked) in enumerate(placed):
            predicted = pool.on_placed(preq, ranked[0])
            ctx.metrics.observe_placement(ranked[0], len(preq.prompt_token_ids), predicted)
            for i in range(self.n):
                # Siblings must not draw the same random numbers: seed + i, like vLLM.
                params = self.params if self.params.seed is None else self.params.replace(
                    seed=self.params.seed + i)
                index = p * self.n + i
                req = GenerateRequest(f"{self.id}-{index}", preq.prompt_token_ids, params, self.priority)
                choice = _Choice(index, p, req, ctx.tok.detokenizer(preq.prompt_token_ids, params))
                self.choices.append(choice)
                self._tasks.append(ctx.spawn(self._run(choice, ranked[:2])))
        self._open = len(self.choices)

    async def next_event(self) -> _Event | None:
        """The next event of any choice; None once all have ended. Past the deadline: cancel, 504."""
        if self._open == 0:
            return None
        remaining = self.deadline - self.ctx.clock()
        try:
            event = await asyncio.wait_for(self._queue.get(), max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.cancel()
            raise ApiError(504, f"the request did not finish within request_timeout_s "
                                f"({self.ctx.config.request_timeout_s} s)", code="deadline_exceeded") from None
        if event.finished or event.error is not None:
            self._open -= 1
        return event

    def cancel(self) -> None:
        """Stop every child (synchronous: safe in a cancelled scope); each aborts on its worker."""
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def finish(self) -> None:
        """Record the request's metrics once, however it ended."""
        if self._finished:
            return
        self._finished = True
        self.cancel()
        self.ctx.metrics.e2e.labels(self.endpoint).observe(self.ctx.clock() - self.arrival)
        self.ctx.metrics.observe_reported_cached(self.cached_tokens())

    def cached_tokens(self) -> int:
        """Per prompt, the most cached tokens any of its choices reported (siblings share a prefix)."""
        best: dict[int, int] = {}
        for c in self.choices:
            best[c.prompt_index] = max(best.get(c.prompt_index, 0), c.num_cached_tokens)
        return sum(best.values())

    def usage(self) -> Usage:
        prompt = sum(len(p.token_ids) for p in self.prompts)
        completion = sum(c.num_tokens for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens()))

    # -- children -------------------------------------------------------------------------------

    async def _run(self, choice: _Choice, workers: list[str]) -> None:
        try:
            for attempt, worker_id in enumerate(workers):
                error = await self._attempt(choice, worker_id)
                if error is None:
                    return
                last = attempt == len(workers) - 1
                if choice.num_tokens or last or error.status < 500:
                    self._queue.put_nowait(_Event(choice, finished=True, error=error))
                    return
                log.warning("request %s: %s; retrying on worker %s", choice.request.request_id, error.message,
                            workers[attempt + 1])
                self.ctx.metrics.retries.labels(worker_id).inc()
                self.ctx.pool.policy.on_request_placed(self._placements[choice.prompt_index], workers[attempt + 1])
            self._queue.put_nowait(_Event(choice, finished=True, error=self.ctx.no_worker_error()))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must end the choice with an error, never hang the client
            log.exception("request %s failed in the router", choice.request.request_id)
            self._queue.put_nowait(_Event(choice, finished=True, error=ApiError(500, f"router error: {e}")))

    async def _attempt(self, choice: _Choice, worker_id: str) -> ApiError | None:
        """Stream ``choice`` from one worker; None when it finished, else why it could not."""
        pool = self.ctx.pool
        try:
            handle = pool.handle(worker_id)
        except WorkerUnavailable as e:
            return ApiError(503, str(e), code="worker_unavailable", retry_after=self.ctx.config.retry_after_s)
        choice.worker_id = worker_id
        rid = choice.request.request_id
        pool.acquire(worker_id)
        stream, ended_on_worker = None, False
        try:
            stream = handle.generate(choice.request)
            async for delta in stream:
                if delta.finish_reason in ("error", "abort"):  # we never asked for this abort
                    ended_on_worker = True
                    return ApiError(500, f"worker {worker_id} ended request {rid}: "
                                         f"{delta.error or delta.finish_reason}", code="worker_error")
                if self._apply(choice, delta):
                    ended_on_worker = delta.finish_reason is not None
                    return None
            return ApiError(503, f"worker {worker_id} ended the stream of {rid} without a finish reason",
                            code="worker_unavailable", retry_after=self.ctx.config.retry_after_s)
        except ValueError as e:
            if choice.num_tokens:
                raise
            ended_on_worker = True  # refused: it never started there
            return ApiError(400, str(e), param=_param_of(str(e)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            pool.mark_failed(worker_id, f"{type(e).__name__}: {e}")
            return ApiError(503, f"worker {worker_id} failed: {e}", code="worker_unavailable",
                            retry_after=self.ctx.config.retry_after_s)
        finally:
            pool.release(worker_id)
            await _aclose_quietly(stream)
            if not ended_on_worker:  # a stop string, a disconnect, a deadline or a failure: free its KV
                await _abort_quietly(handle, rid)

    def _apply(self, choice: _Choice, delta) -> bool:
        """Fold one delta into ``choice``; queue what the client should see. True when it finished."""
        now, metrics = self.ctx.clock(), self.ctx.metrics
        if delta.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.ttft.labels(self.endpoint).observe(now - self.arrival)
            elif choice.last_token_at is not None:
                metrics.inter_token.labels(self.endpoint).observe(now - choice.last_token_at)
            choice.last_token_at = now
            choice.num_tokens += len(delta.token_ids)
            metrics.generation_tokens.inc(len(delta.token_ids))
        choice.num_cached_tokens = max(choice.num_cached_tokens, delta.num_cached_tokens)
        hit = choice.detok.update(delta.token_ids) if delta.token_ids else None
        if hit is not None:
            choice.finish_reason, choice.stop_reason = "stop", hit
        elif delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        finished = choice.finish_reason is not None
        text = choice.detok.get_next_output_text(finished, delta=True)
        choice.text += text
        logprobs = tuple(delta.logprobs) if choice.request.sampling.logprobs is not None else ()
        choice.logprobs.extend(logprobs)
        if text or logprobs or finished:
            self._queue.put_nowait(_Event(choice, text, logprobs, finished))
        return finished


async def _aclose_quietly(stream) -> None:
    if stream is not None and hasattr(stream, "aclose"):
        try:
            await stream.aclose()
        except Exception:
            log.debug("closing a worker stream failed", exc_info=True)


async def _abort_quietly(handle, request_id: str) -> None:
    try:
        await asyncio.wait_for(handle.abort(request_id), _ABORT_TIMEOUT_S)
    except Exception:  # the worker is gone or slow; its own stream cancellation covers it
        log.debug("abort of %s failed", request_id, exc_info=True)


# -- response formats -----------------------------------------------------------------------------------


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


class _CompletionFormat:
    """``/v1/completions`` bodies: text choices, logprobs as parallel lists."""

    def __init__(self, gen: _Generation, model: str, tok: RouterTokenizer, echo: bool):
        self.gen, self.model, self.tok = gen, model, tok
        self.id = f"cmpl-{gen.id}"
        self.created = int(time.time())
        self.echo = [self._prompt_text(p) for p in gen.prompts] if echo else None
        self._offsets: dict[int, int] = {}

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt.text if prompt.text is not None else self.tok.decode(prompt.token_ids)

    def _logprobs(self, choice: _Choice, lps) -> CompletionLogprobs | None:
        if choice.request.sampling.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(choice.index, len(self.echo[choice.prompt_index]) if self.echo else 0)
        for lp in lps:
            token = self.tok.token_str(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            top = {self.tok.token_str(t): v for t, v in lp.top}
            top.setdefault(token, lp.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        self._offsets[choice.index] = offset
        return out

    def start_chunks(self) -> list[str]:
        if not self.echo:
            return []
        return [_sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[
            CompletionChoice(index=c.index, text=self.echo[c.prompt_index])])) for c in self.gen.choices]

    def event_chunk(self, ev: _Event) -> str:
        c = ev.choice
        choice = CompletionChoice(index=c.index, text=ev.text, logprobs=self._logprobs(c, ev.logprobs),
                                  finish_reason=c.finish_reason if ev.finished else None,
                                  stop_reason=c.stop_reason if ev.finished else None)
        return _sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def usage_chunk(self) -> str:
        return _sse(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                    usage=self.gen.usage()))

    def response(self) -> CompletionResponse:
        choices = []
        for c in self.gen.choices:
            self._offsets.pop(c.index, None)
            text = (self.echo[c.prompt_index] if self.echo else "") + c.text
            choices.append(CompletionChoice(index=c.index, text=text, logprobs=self._logprobs(c, c.logprobs),
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self.gen.usage())


class _ChatFormat:
    """``/v1/chat/completions`` bodies: assistant messages, per-token logprob objects."""

    def __init__(self, gen: _Generation, model: str, tok: RouterTokenizer):
        self.gen, self.model, self.tok = gen, model, tok
        self.id = f"chatcmpl-{gen.id}"
        self.created = int(time.time())

    def _entry(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.tok.token_str(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    def _logprobs(self, choice: _Choice, lps) -> ChatChoiceLogprobs | None:
        if choice.request.sampling.logprobs is None:
            return None
        content = []
        for lp in lps:
            e = self._entry(lp.token_id, lp.logprob)
            content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                            top_logprobs=[self._entry(t, v) for t, v in lp.top]))
        return ChatChoiceLogprobs(content=content)

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
        return _sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=usage))

    def start_chunks(self) -> list[str]:
        return [self._chunk([ChatStreamChoice(index=c.index, delta={"role": "assistant", "content": ""})])
                for c in self.gen.choices]

    def event_chunk(self, ev: _Event) -> str:
        c = ev.choice
        choice = ChatStreamChoice(index=c.index, delta={"content": ev.text} if ev.text else {},
                                  logprobs=self._logprobs(c, ev.logprobs),
                                  finish_reason=c.finish_reason if ev.finished else None,
                                  stop_reason=c.stop_reason if ev.finished else None)
        return self._chunk([choice])

    def usage_chunk(self) -> str:
        return self._chunk([], self.gen.usage())

    def response(self) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(c, c.logprobs), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in self.gen.choices]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self.gen.usage())


class _SSEResponse(StreamingResponse):
    """A ``text/event-stream`` that always notices a client going away, and always cleans up.

    Starlette listens for ``http.disconnect`` only on servers reporting ASGI spec < 2.4; with 2.4 it
    waits for a write to fail, which uvicorn's h11 protocol silently drops instead. This listens on
    any server, and runs ``on_close`` (abort the children, free the concurrency slot) however the
    response ends, even if the body iterator never started.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()
        finally:
            self._on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# -- the app --------------------------------------------------------------------------------------------


class _Context:
    """Everything the endpoints share; one per app (no module state)."""

    def __init__(self, config: RouterConfig, pool: WorkerPool, tok: RouterTokenizer, metrics: RouterMetrics,
                 clock: Callable[[], float]) -> None:
        self.config, self.pool, self.tok, self.metrics, self.clock = config, pool, tok, metrics, clock
        self.admission = Admission(config.max_concurrent_requests, config.max_waiting_requests,
                                   config.queue_timeout_s, config.retry_after_s, metrics)
        self._tasks: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def no_worker_error(self) -> ApiError:
        return ApiError(503, "no healthy worker is available", code="no_healthy_worker",
                        retry_after=self.config.retry_after_s)

    def model_names(self) -> list[str]:
        if self.config.served_model_name:
            return [self.config.served_model_name]
        return self.pool.model_names()

    def check_model(self, model: str | None) -> str:
        names = self.model_names()
        if model and names and model not in names:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves {names}",
                           param="model", code="model_not_found")
        return model or (names[0] if names else "unknown")

    def max_tokens(self, prompts: list[Prompt], requested: int | None, default: int | None, field: str,
                   max_field: str) -> int:
        """The children's max_tokens, after checking the prompt and the request against the limits."""
        max_len = self.pool.max_model_len()
        if max_len is None:
            raise self.no_worker_error()
        limit, why = max_len - 1, f"the model's context length ({max_len}) less one generated token"
        if self.config.max_prompt_tokens is not None and self.config.max_prompt_tokens < limit:
            limit, why = self.config.max_prompt_tokens, "max_prompt_tokens"
        longest = max(len(p.token_ids) for p in prompts)
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

    def check_limits(self, n: int, num_prompts: int, logprobs: int | None, stop: tuple[str, ...],
                     logprobs_field: str) -> None:
        cfg = self.config
        if n * num_prompts > cfg.max_n:
            what = "n" if num_prompts == 1 else f"n times the number of prompts ({num_prompts})"
            raise ApiError(400, f"n: {what} must be <= {cfg.max_n} (max_n), got {n * num_prompts}", param="n")
        if logprobs is not None and logprobs > cfg.max_logprobs:
            raise ApiError(400, f"{logprobs_field}: must be <= {cfg.max_logprobs}, got {logprobs}",
                           param=logprobs_field)
        if len(stop) > cfg.max_stop_sequences:
            raise ApiError(400, f"stop: at most {cfg.max_stop_sequences} stop sequences, got {len(stop)}",
                           param="stop")


def create_app(config: RouterConfig, pool: WorkerPool, tokenizer: Tokenizer | RouterTokenizer, *,
               metrics: RouterMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """The router app. Its lifespan starts the pool's polling and closes the pool (and so the worker
    handles) at shutdown; the pool must not be shared with another app."""
    tok = tokenizer if isinstance(tokenizer, RouterTokenizer) else RouterTokenizer(tokenizer)
    ctx = _Context(config, pool, tok, metrics or RouterMetrics(), clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="shoal router", lifespan=lifespan)
    app.state.ctx = ctx
    app.add_middleware(_CountRequests, metrics=ctx.metrics)
    _add_error_handlers(app)
    _add_generation_routes(app, ctx)
    _add_utility_routes(app, ctx)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500
                                       else "server_error"), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


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


def _parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        body = validation_error_body(e)["error"]
        raise ApiError(400, body["message"], param=body["param"]) from None


def _sampling_params(build: Callable[[int], SamplingParams], max_tokens: int) -> SamplingParams:
    try:
        return build(max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), param=_param_of(str(e))) from None


def _add_generation_routes(app: FastAPI, ctx: _Context) -> None:
    cfg, tok = ctx.config, ctx.tok

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = _parse(CompletionRequest, await _read_json(request, cfg.max_body_bytes))
        model = ctx.check_model(req.model)
        try:
            prompts = await asyncio.to_thread(tok.encode_completion_prompts, req.prompts())
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        ctx.check_limits(req.n, len(prompts), req.logprobs, req.stop_list, "logprobs")
        max_tokens = ctx.max_tokens(prompts, req.max_tokens, cfg.default_completion_max_tokens, "prompt",
                                    "max_tokens")
        params = _sampling_params(req.to_sampling_params, max_tokens)
        gen = _Generation(ctx, "completions", prompts, params, req.n,
                          request.headers.get("x-session-id") or req.user, req.priority)
        fmt = _CompletionFormat(gen, model, tok, req.echo)
        return await _respond(request, ctx, gen, fmt, req.stream, req.include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_json(request, cfg.max_body_bytes))
        model = ctx.check_model(req.model)
        messages = [m.for_template() for m in req.messages]
        try:
            prompt = await asyncio.to_thread(tok.encode_chat, messages, req.add_generation_prompt,
                                             req.continue_final_message, req.chat_template_kwargs)
        except Exception as e:  # template errors (raise_exception, bad roles) are the caller's
            raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        ctx.check_limits(req.n, 1, logprobs, req.stop_list, "top_logprobs")
        max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = ctx.max_tokens([prompt], req.requested_max_tokens, None, "messages", max_field)
        params = _sampling_params(req.to_sampling_params, max_tokens)
        gen = _Generation(ctx, "chat_completions", [prompt], params, req.n,
                          request.headers.get("x-session-id") or req.user, req.priority)
        return await _respond(request, ctx, gen, _ChatFormat(gen, model, tok), req.stream, req.include_usage)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_disconnected(request: Request, awaitable):
    """Await ``awaitable``; if the client disconnects first, cancel it and raise ``_ClientGone``.

    uvicorn does not cancel a handler whose client left, so a queued request or a long prefill would
    otherwise run to completion for nobody.
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


async def _respond(request: Request, ctx: _Context, gen: _Generation, fmt, stream: bool,
                   include_usage: bool) -> Response:
    """Admit, start, and answer: JSON once all choices end, or SSE from the first event on.

    A stream's headers wait for its first event, so an error before any token (bad request on the
    worker, every worker failing) is still a proper status code.
    """
    try:
        await _unless_disconnected(request, ctx.admission.acquire())
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it; the status only reaches the metrics
    closed = handed_over = False

    def close() -> None:  # exactly once, wherever the request ends
        nonlocal closed
        if not closed:
            closed = True
            gen.finish()
            ctx.admission.release()

    try:
        gen.start()
        if not stream:
            return await _unless_disconnected(request, _collect(gen, fmt))
        first = await _unless_disconnected(request, gen.next_event())
        if first is not None and first.error is not None:
            raise first.error
        handed_over = True
        return _SSEResponse(_stream_events(gen, fmt, first, include_usage, close), close)
    except _ClientGone:
        return Response(status_code=499)
    finally:
        if not handed_over:
            close()


async def _stream_events(gen: _Generation, fmt, first: _Event | None, include_usage: bool,
                         close: Callable[[], None]) -> AsyncIterator[str]:
    try:
        for chunk in fmt.start_chunks():
            yield chunk
        event = first
        while event is not None:
            if event.error is not None:  # after the first token: end the stream with the error
                yield _sse(event.error.body())
                break
            yield fmt.event_chunk(event)
            event = await gen.next_event()
        else:
            if include_usage:
                yield fmt.usage_chunk()
    except ApiError as e:  # the deadline
        yield _sse(e.body())
    finally:
        close()
    yield "data: [DONE]\n\n"


async def _collect(gen: _Generation, fmt) -> Response:
    """Every event, then one JSON body (the first error instead, as its status)."""
    while (event := await gen.next_event()) is not None:
        if event.error is not None:
            raise event.error
    return JSONResponse(fmt.response().model_dump())


def _add_utility_routes(app: FastAPI, ctx: _Context) -> None:
    cfg, tok, pool = ctx.config, ctx.tok, ctx.pool

    @app.get("/v1/models")
    async def models():
        max_len = pool.max_model_len()
        return ModelList(data=[ModelCard(id=name, max_model_len=max_len) for name in ctx.model_names()]).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = _parse(TokenizeRequest, await _read_json(request, cfg.max_body_bytes))
        ctx.check_model(req.model)
        try:
            if req.messages is not None:
                prompt = await asyncio.to_thread(tok.encode_chat, [m.for_template() for m in req.messages],
                                                 req.add_generation_prompt)
                ids = list(prompt.token_ids)
            else:
                ids = await asyncio.to_thread(tok.tokenizer.encode, req.prompt, req.add_special_tokens)
        except Exception as e:
            raise ApiError(400, f"{'messages' if req.messages else 'prompt'}: {e}",
                           param="messages" if req.messages else "prompt") from None
        return TokenizeResponse(count=len(ids), max_model_len=pool.max_model_len(), tokens=ids,
                                token_strs=tok.token_strs(ids) if req.return_token_strs else None).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = _parse(DetokenizeRequest, await _read_json(request, cfg.max_body_bytes))
        ctx.check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"tokens: token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                           param="tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False)).model_dump()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        healthy = sum(1 for s in pool.states() if s.healthy)
        if not healthy:
            return ctx.no_worker_error().response()
        return {"status": "ready", "healthy_workers": healthy, "workers": len(pool)}

    @app.get("/metrics")
    async def metrics():
        ctx.metrics.observe_pool(pool)
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


class _CountRequests:
    """Pure ASGI middleware: count requests by route and status (streams count when they end)."""

    _ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions",
               "/v1/models": "models", "/tokenize": "tokenize", "/detokenize": "detokenize",
               "/health": "health", "/ready": "ready", "/metrics": "metrics"}

    def __init__(self, app, metrics: RouterMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = self._ROUTES.get(scope.get("path", ""), "other")
            self.metrics.requests.labels(endpoint, str(status)).inc()
