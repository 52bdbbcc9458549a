"""``shoal bench router``: the time the router adds between a client and a worker, both ways.

The layout is ``shoal serve``'s: the worker is a real ``shoal.workers.server`` process (gRPC on
127.0.0.1; by default a tiny random-weight Llama with SmolLM2's vocabulary, so a step takes
milliseconds), and the router is the real app on a real uvicorn, streaming SSE. The router, its
uvicorn and the benchmark's client share this process's one event loop (as a router replica's
process would hold only the router); the engine's work is in the worker process.

The same requests run at concurrency 1 two ways, alternating (no prefix caching on the worker, so
both do the same work):

* **router**: the client posts the prompt text to ``/v1/completions`` (stream) and times each SSE chunk;
* **direct**: the client hands the same token ids to a ``GrpcWorkerClient`` of the same worker.

Both go through :class:`TimedHandle`, which stamps when a request is handed to the worker and when
each delta comes out of it. With one clock for all, the router's overhead is measured without the
engine's noise:

* ``in``: client sends -> request handed to the worker (body, validation, tokenizing, admission,
  placement); direct, this is ~0;
* ``out``: delta out of the worker -> the client has its chunk (detokenizing, SSE, HTTP), per token;
* ``ttft``: client-side time to first token, each way; ``ttft added`` is router minus direct.

The router's socket is bound here with ``IPPROTO_TCP`` so asyncio sets ``TCP_NODELAY`` on its
connections; ``--no-nodelay`` binds it as ``shoal serve`` did (proto 0), which shows the Nagle stall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from shoal.workers.models.presets import PRESETS
from shoal.workers.protocol import GenerateRequest, TokenDelta

from .report import environment, format_table, write_json

# A 2-layer Llama with SmolLM2's vocabulary: the real tokenizer applies, a decode step takes milliseconds.
TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]

PERCENTILES = (50.0, 90.0, 99.0)


# -- timing a worker handle -----------------------------------------------------------------------------


@dataclass
class Call:
    """One request as a worker handle saw it: when it was handed over, when each delta came out."""

    request_id: str
    sent: float
    delta_times: list[float] = field(default_factory=list)
    delta_tokens: list[int] = field(default_factory=list)


class TimedHandle:
    """A ``WorkerHandle`` around another that stamps each request and delta with ``clock``."""

    def __init__(self, inner, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner, self.worker_id, self.clock = inner, inner.worker_id, clock
        self.calls: list[Call] = []

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenDelta]:
        call = Call(req.request_id, self.clock())  # runs at the first read: the request goes out now
        self.calls.append(call)
        async for delta in self.inner.generate(req):
            call.delta_times.append(self.clock())
            call.delta_tokens.append(len(delta.token_ids))
            yield delta

    async def abort(self, request_id: str) -> None:
        await self.inner.abort(request_id)

    async def get_load(self):
        return await self.inner.get_load()

    async def get_info(self):
        return await self.inner.get_info()

    async def health(self) -> bool:
        return await self.inner.health()

    def kv_events(self):
        return self.inner.kv_events()

    async def close(self) -> None:
        await self.inner.close()


# -- one request each way -------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request's timings (seconds, from the client's send); ``out`` per delta, when aligned."""

    path: str  # "router" or "direct"
    ttft: float
    e2e: float
    tokens: int
    in_: float
    out: list[float]
    aligned: bool


async def run_router_request(client, handle: TimedHandle, prompt: str, max_tokens: int) -> Sample:
    """POST a streamed completion; chunk k is delta k's when every delta made one chunk (``aligned``)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True}
    received: list[float] = []
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"router answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                received.append(time.perf_counter())
                if "error" in json.loads(line[6:]):
                    raise RuntimeError(f"router stream failed: {line}")
    call = handle.calls[-1]
    aligned = len(received) == len(call.delta_times)
    out = [r - d for r, d in zip(received, call.delta_times)] if aligned else []
    return Sample("router", received[0] - t0, received[-1] - t0, sum(call.delta_tokens), call.sent - t0, out,
                  aligned)


async def run_direct_request(handle: TimedHandle, request_id: str, prompt_ids: tuple[int, ...],
                             max_tokens: int) -> Sample:
    from shoal.workers.engine.sampling_params import SamplingParams

    req = GenerateRequest(request_id, prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                 ignore_eos=True))
    received: list[float] = []
    t0 = time.perf_counter()
    async for _ in handle.generate(req):
        received.append(time.perf_counter())
    call = handle.calls[-1]
    out = [r - d for r, d in zip(received, call.delta_times)]
    return Sample("direct", received[0] - t0, received[-1] - t0, sum(call.delta_tokens), call.sent - t0, out, True)


# -- summary --------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(samples: list[Sample]) -> dict:
    """Per metric and path: p50/p90/p99 in ms; and the router's additions (router minus direct)."""
    by = {p: [s for s in samples if s.path == p] for p in ("router", "direct")}
    series = {}
    for path, ss in by.items():
        series[path] = {"ttft": [s.ttft for s in ss], "in": [s.in_ for s in ss],
                        "out": [x for s in ss for x in s.out]}
    # Paired: request i of each path used the same prompt and ran back to back.
    paired = [r.ttft - d.ttft for r, d in zip(by["router"], by["direct"])]
    rows = []
    for metric, label in (("ttft", "time to first token"), ("in", "client send -> worker has the request"),
                          ("out", "delta leaves worker -> client has it (per token)")):
        r, d = series["router"][metric], series["direct"][metric]
        row = {"metric": metric, "what": label, "samples": len(r)}
        for p in PERCENTILES:
            row[f"router_p{p:g}_ms"] = percentile(r, p) * 1e3
            row[f"direct_p{p:g}_ms"] = percentile(d, p) * 1e3
            row[f"added_p{p:g}_ms"] = row[f"router_p{p:g}_ms"] - row[f"direct_p{p:g}_ms"]
        rows.append(row)
    summary = {"rows": rows,
               "ttft_added_paired_ms": {f"p{p:g}": percentile(paired, p) * 1e3 for p in PERCENTILES},
               "router_requests": len(by["router"]), "direct_requests": len(by["direct"]),
               "router_requests_aligned": sum(s.aligned for s in by["router"]),
               "tokens_per_request": statistics.median(s.tokens for s in samples) if samples else 0}
    return summary


# -- the run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterBenchConfig:
    requests: int = 100  # per path
    warmup: int = 5  # per path, not counted
    max_tokens: int = 16
    prompt_words: int = 32

    def __post_init__(self) -> None:
        for name, low in (("requests", 1), ("warmup", 0), ("max_tokens", 1), ("prompt_words", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


def prompts(n: int, words: int) -> list[str]:
    """Distinct prompts of about the same length."""
    vocab = ("river", "stone", "light", "market", "north", "garden", "copper", "signal", "winter", "paper")
    return [f"Request {i}: " + " ".join(vocab[(i + j) % len(vocab)] for j in range(words)) for i in range(n)]


async def measure(endpoint: str, tokenizer, cfg: RouterBenchConfig, nodelay: bool = True) -> dict:
    """Run both paths against the worker at ``endpoint``, alternating which goes first; the summary."""
    import httpx
    import uvicorn

    from shoal.router.app import create_app
    from shoal.router.config import RouterConfig
    from shoal.router.worker_client import GrpcWorkerClient
    from shoal.router.worker_pool import make_pool

    config = RouterConfig(served_model_name="bench", placement="round_robin")
    pool = make_pool(config)
    routed = TimedHandle(GrpcWorkerClient("bench-worker", endpoint))
    pool.add(routed)
    app = create_app(config, pool, tokenizer)
    direct = TimedHandle(GrpcWorkerClient("bench-worker", endpoint))
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so. Without it the first
    # SSE chunk after the headers waits for the client's delayed ACK (~40 ms, Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP if nodelay else 0)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        texts = prompts(cfg.warmup + cfg.requests, cfg.prompt_words)
        ids = [tuple(tokenizer.encode(t)) for t in texts]  # what the router's tokenizer makes of them
        samples: list[Sample] = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for i, (text, prompt_ids) in enumerate(zip(texts, ids)):
                router = lambda: run_router_request(client, routed, text, cfg.max_tokens)  # noqa: E731
                straight = lambda: run_direct_request(direct, f"direct-{i}", prompt_ids, cfg.max_tokens)  # noqa: E731
                pair = [router, straight] if i % 2 == 0 else [straight, router]  # alternate: cancel drift
                done = [await run() for run in pair]
                if i >= cfg.warmup:
                    samples += sorted(done, key=lambda s: s.path != "router")
        return summarize(samples)
    finally:
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        await direct.close()
        sock.close()


def tiny_model_dir() -> str:
    path = Path(tempfile.mkdtemp(prefix="shoal-bench-router-"))
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


def worker_flags(model: str | None, device: str) -> list[str]:
    """Engine flags of the worker: ``model`` None is the tiny model; prefix caching off (equal work)."""
    flags = ["--model", model or tiny_model_dir(), "--device", device, "--dtype", "float32",
             "--no-prefix-caching", "--num-kv-blocks", "256", "--max-model-len", "2048"]
    if model is None:
        flags += ["--load-format", "dummy"]
    return flags


def _loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(cfg: RouterBenchConfig, model: str | None = None, tokenizer_path: str | None = None,
        device: str = "cpu", start_timeout_s: float = 300.0, nodelay: bool = True) -> dict:
    from shoal.cluster.worker_process import WorkerProcess
    from shoal.workers.models.loader import smollm2_path, tokenizer_path as model_tokenizer
    from shoal.workers.tokenizer import Tokenizer

    tok_path = tokenizer_path or (model_tokenizer(model) if model else None) or str(smollm2_path())
    tokenizer = Tokenizer.from_path(tok_path)
    worker = WorkerProcess("bench-worker", worker_flags(model, device))
    worker.start()
    try:
        endpoint = worker.wait_ready(start_timeout_s)
        # The loop shoal serve's uvicorn runs on: uvloop when installed (uvicorn's loop="auto").
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(measure(endpoint, tokenizer, cfg, nodelay))
    finally:
        worker.stop()


def format_report(result: dict) -> str:
    cols = ["metric", "samples"] + [f"{w}_p{p:g}_ms" for w in ("router", "direct", "added") for p in PERCENTILES]
    lines = [format_table(result["rows"], cols, title="router overhead, concurrency 1 (ms)")]
    paired = result["ttft_added_paired_ms"]
    lines.append("ttft added, paired per prompt: " + ", ".join(f"{k} {v:.3f} ms" for k, v in paired.items()))
    lines.append(f"requests aligned chunk-per-delta: {result['router_requests_aligned']}/"
                 f"{result['router_requests']}; tokens per request: {result['tokens_per_request']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=100, help="measured requests per path (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="uncounted requests per path first")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (ignore_eos)")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--model", default=None, help="worker model (default: a tiny random Llama with SmolLM2's "
                                                "vocabulary, --load-format dummy)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's, else SmolLM2's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-nodelay", dest="nodelay", action="store_false",
                   help="bind the router's socket with proto 0 (no TCP_NODELAY), as shoal serve's bind_socket does")
    p.add_argument("--result-file", default=None)


def run_from_args(args: argparse.Namespace) -> dict:
    cfg = RouterBenchConfig(requests=args.requests, warmup=args.warmup, max_tokens=args.max_tokens,
                            prompt_words=args.prompt_words)
    result = run(cfg, args.model, args.tokenizer, args.device, nodelay=args.nodelay)
    payload = {"benchmark": "router", "env": environment(), "config": asdict(cfg), "worker": "shoal.workers.server process over gRPC on 127.0.0.1",
               "tcp_nodelay": args.nodelay,
               "model": args.model or "tiny (2 layers, hidden 64, SmolLM2 vocabulary, dummy weights)", **result}
    print(format_report(result))
    write_json(args.result_file, payload)
    return payload
