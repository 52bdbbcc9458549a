"""``shoal bench router``: the time the router adds between a client and a worker, both ways.

The layout is ``shoal serve``'s: the worker is a real ``shoal.workers.server`` process (gRPC on
127.0.0.1; by default a tiny random-weight Llama with SmolLM2's vocabulary, so a step takes
milliseconds), and the router is the real app on a real uvicorn, streaming SSE, alone on this
process's event loop (as a router replica's process holds only the router). The client is a separate
process, as a real client is: its request building and response parsing are not the router's time.

The same requests run at concurrency 1 two ways, alternating (no prefix caching on the worker, so
both do the same work), both from the client process:

* **router**: the client posts the prompt text to ``/v1/completions`` (stream) and times each SSE event;
* **direct**: the client hands the same token ids to a ``GrpcWorkerClient`` of the same worker.

The router path's client is :class:`SSEConnection` by default: it sends each request in one write and
stamps an event when its bytes reach the process, so neither its request building nor its response
parsing is counted. ``--client httpx`` uses httpx instead (stamped from its first byte out), to show
what a general-purpose client's response handling adds on top (about 0.8 ms to the first token here).

Both go through :class:`TimedHandle` (the router's in this process, the direct one in the client's),
which stamps when a request is handed to the worker and when each delta comes out of it. Every stamp,
in either process, is ``time.monotonic_ns`` (Linux's ``CLOCK_MONOTONIC``: one clock for all processes
of a host), so the router's overhead is measured without the engine's noise:

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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from shoal.workers.models.presets import PRESETS
from shoal.workers.protocol import GenerateRequest, TokenDelta

from .report import environment, format_table, write_json
from .sse import sse_lines

# A 2-layer Llama with SmolLM2's vocabulary: the real tokenizer applies, a decode step takes milliseconds.
TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]

PERCENTILES = (50.0, 90.0, 99.0)

CLIENTS = ("raw", "httpx")

# CLOCK_MONOTONIC, in ns: the router's process and the client's stamp with the same clock.
CLOCK: Callable[[], int] = time.monotonic_ns


# -- timing a worker handle -----------------------------------------------------------------------------


@dataclass
class Call:
    """One request as a worker handle saw it: when it was handed over, when each delta came out (ns)."""

    request_id: str
    sent: int
    delta_times: list[int] = field(default_factory=list)
    delta_tokens: list[int] = field(default_factory=list)


class TimedHandle:
    """A ``WorkerHandle`` around another that stamps each request and delta with ``clock``."""

    def __init__(self, inner, clock: Callable[[], int] = CLOCK) -> None:
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

    async def get_metrics(self) -> str:
        return await self.inner.get_metrics()

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


def to_sample(path: str, t0: int, received: list[int], call: Call) -> Sample:
    """A request's timings from the client's stamps (send ``t0``, each chunk) and the handle's ``call``.

    Chunk k is delta k's when every delta made one chunk (``aligned``); else ``out`` is left empty.
    """
    if not received:
        raise RuntimeError(f"{path} request {call.request_id} received no chunk")
    aligned = len(received) == len(call.delta_times)
    out = [(r - d) * 1e-9 for r, d in zip(received, call.delta_times)] if aligned else []
    return Sample(path, (received[0] - t0) * 1e-9, (received[-1] - t0) * 1e-9, sum(call.delta_tokens),
                  (call.sent - t0) * 1e-9, out, aligned)


def completion_body(prompt: str, max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True}


class SSEConnection(asyncio.Protocol):
    """A lean HTTP/1.1 keep-alive client for streamed completions that stamps each SSE ``data:`` event
    the moment its bytes reach this process (``data_received``), before any parsing.

    A general client does work of its own on both sides: httpx here takes about 0.5 ms to build a
    request before its first byte leaves, and its response handling adds about 0.8 ms before it hands
    out the first line; a benchmark of the router must count neither. The request leaves in one write;
    the response must be chunked SSE (what the router sends) or an error, raised with its body.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done: asyncio.Future | None = None
        self._transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.status: int | None = None
        self._headers_done = False
        self._chunked = False
        self._content_length = 0
        self._events = bytearray()  # SSE text not yet split into events
        self.received: list[int] = []
        self.lines: list[bytes] = []

    @classmethod
    async def open(cls, host: str, port: int) -> "SSEConnection":
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"the router closed the connection: {exc}"))

    async def post(self, path: str, body: bytes) -> int:
        """Send one request and wait for its whole response; the send stamp. The events' stamps and
        lines stay in ``received`` / ``lines``; a non-200 answer raises with its body."""
        self._reset()
        head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        request = head + body
        self._done = asyncio.get_running_loop().create_future()
        t0 = CLOCK()
        self._transport.write(request)
        await self._done
        if self.status != 200:
            raise RuntimeError(f"router answered {self.status}: {bytes(self._events).decode()[:300]}")
        return t0

    def data_received(self, data: bytes) -> None:
        now = CLOCK()
        self._buf += data
        try:
            if not self._headers_done and not self._parse_headers():
                return
            self._parse_body(now)
        except Exception as e:  # a malformed answer ends the benchmark with the reason
            if not self._done.done():
                self._done.set_exception(e)

    def _parse_headers(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding" and value == "chunked":
                self._chunked = True
            elif name == "content-length":
                self._content_length = int(value)
        self._headers_done = True
        return True

    def _parse_body(self, now: int) -> None:
        if not self._chunked:  # an error body with a length
            if len(self._buf) >= self._content_length:
                self._events += self._buf[:self._content_length]
                del self._buf[:self._content_length]
                self._done.set_result(None)
            return
        while (eol := self._buf.find(b"\r\n")) >= 0:
            size = int(self._buf[:eol], 16)
            if len(self._buf) < eol + 2 + size + 2:
                return
            payload = self._buf[eol + 2:eol + 2 + size]
            del self._buf[:eol + 2 + size + 2]
            if size == 0:
                self._done.set_result(None)
                return
            self._events += payload
            while (sep := self._events.find(b"\n\n")) >= 0:
                event = bytes(self._events[:sep])
                del self._events[:sep + 2]
                if event.startswith(b"data: ") and event != b"data: [DONE]":
                    self.received.append(now)
                    self.lines.append(event)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def run_router_request(conn: SSEConnection, prompt: str, max_tokens: int) -> dict:
    """POST a streamed completion: when it went out and when each ``data:`` event came in."""
    body = json.dumps(completion_body(prompt, max_tokens)).encode()
    t0 = await conn.post("/v1/completions", body)
    for line in conn.lines:  # parsed after the stream, so parsing never delays the next event's stamp
        if "error" in json.loads(line[6:]):
            raise RuntimeError(f"router stream failed: {line.decode()}")
    return {"path": "router", "t_call": t0, "t0": t0, "received": list(conn.received)}


async def run_httpx_request(client, prompt: str, max_tokens: int) -> dict:
    """The same with httpx: stamped from httpcore's ``send_request_headers.started`` trace event, so the
    client's request building is left out (kept as ``t_call`` to report it); its response handling
    (headers, line splitting) before each line is handed out still counts."""
    stamps: dict[str, int] = {}

    async def trace(event: str, info: dict) -> None:
        if event == "http11.send_request_headers.started":
            stamps["t0"] = CLOCK()

    received: list[int] = []
    lines: list[str] = []
    t_call = CLOCK()
    async with client.stream("POST", "/v1/completions", json=completion_body(prompt, max_tokens),
                             extensions={"trace": trace}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"router answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in sse_lines(r):
            if line.startswith("data: ") and line != "data: [DONE]":
                received.append(CLOCK())
                lines.append(line)
    for line in lines:
        if "error" in json.loads(line[6:]):
            raise RuntimeError(f"router stream failed: {line}")
    return {"path": "router", "t_call": t_call, "t0": stamps["t0"], "received": received}


async def run_direct_request(handle: TimedHandle, request_id: str, prompt_ids: list[int],
                             max_tokens: int) -> dict:
    """The same request straight to the worker: the client's stamps and the handle's, in one record."""
    from shoal.workers.engine.sampling_params import SamplingParams

    req = GenerateRequest(request_id, tuple(prompt_ids), SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                        ignore_eos=True))
    received: list[int] = []
    t0 = CLOCK()
    async for _ in handle.generate(req):
        received.append(CLOCK())
    return {"path": "direct", "t0": t0, "received": received, "call": asdict(handle.calls[-1])}


# -- the client process ---------------------------------------------------------------------------------


async def run_client(job: dict) -> list[dict]:
    """Every request of ``job`` at concurrency 1, router and direct alternating which goes first.

    ``job``: ``url`` (the router), ``endpoint`` (the worker's gRPC), ``texts`` and their ``ids``,
    ``max_tokens``, ``client`` ("raw" or "httpx"). One record per request, in order of sending.
    """
    import httpx

    from shoal.router.worker_client import GrpcWorkerClient

    direct = TimedHandle(GrpcWorkerClient("bench-worker", job["endpoint"]))
    host, port = job["url"].removeprefix("http://").rsplit(":", 1)
    conn = await SSEConnection.open(host, int(port)) if job["client"] == "raw" else None
    client = httpx.AsyncClient(base_url=job["url"], timeout=60) if conn is None else None
    records: list[dict] = []
    try:
        for i, (text, prompt_ids) in enumerate(zip(job["texts"], job["ids"])):
            def router() -> Awaitable[dict]:
                if conn is not None:
                    return run_router_request(conn, text, job["max_tokens"])
                return run_httpx_request(client, text, job["max_tokens"])

            def straight() -> Awaitable[dict]:
                return run_direct_request(direct, f"direct-{i}", prompt_ids, job["max_tokens"])

            for request in ([router, straight] if i % 2 == 0 else [straight, router]):  # alternate: cancel drift
                records.append({"index": i, **await request()})
    finally:
        if conn is not None:
            conn.close()
        if client is not None:
            await client.aclose()
        await direct.close()
    return records


def client_main(job_path: str) -> None:
    """The client process: the job from a JSON file, its records as JSON on stdout."""
    job = json.loads(Path(job_path).read_text())
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        records = runner.run(run_client(job))
    json.dump(records, sys.stdout)


async def run_client_process(job: dict) -> list[dict]:
    """Run :func:`client_main` in a child process; this loop stays free to serve the router meanwhile.

    ``subprocess.Popen`` (vfork + exec), not the event loop's subprocess support: uvloop forks, and a
    fork while gRPC threads are busy runs gRPC's fork handlers in the child, which crashed it (SIGSEGV)
    now and then.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="shoal-bench-router-") as f:
        json.dump(job, f)
        f.flush()
        code = f"from shoal.cluster.bench.router import client_main; client_main({f.name!r})"
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.to_thread(proc.communicate)
        finally:
            if proc.poll() is None:  # cancelled: the client must not outlive the benchmark
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark client exited with {proc.returncode}: {err.decode()[-2000:]}")
    return json.loads(out)


def collect(records: list[dict], router_calls: list[Call], warmup: int) -> list[Sample]:
    """Samples of the measured requests; router request k is the router handle's call k (concurrency 1)."""
    routed = [r for r in records if r["path"] == "router"]
    if len(routed) != len(router_calls):
        raise RuntimeError(f"{len(routed)} router requests sent but {len(router_calls)} reached the worker")
    calls = iter(router_calls)
    samples = []
    for r in records:
        call = next(calls) if r["path"] == "router" else Call(**r["call"])
        if r["index"] >= warmup:
            samples.append(to_sample(r["path"], r["t0"], r["received"], call))
    return samples  # summarize pairs the i-th of each path: same prompt, back to back


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
    client: str = "raw"  # the router path's HTTP client: "raw" (SSEConnection) or "httpx"

    def __post_init__(self) -> None:
        for name, low in (("requests", 1), ("warmup", 0), ("max_tokens", 1), ("prompt_words", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}, got {self.client!r}")


def prompts(n: int, words: int) -> list[str]:
    """Distinct prompts of about the same length."""
    vocab = ("river", "stone", "light", "market", "north", "garden", "copper", "signal", "winter", "paper")
    return [f"Request {i}: " + " ".join(vocab[(i + j) % len(vocab)] for j in range(words)) for i in range(n)]


async def measure(endpoint: str, tokenizer, cfg: RouterBenchConfig, nodelay: bool = True) -> dict:
    """Serve the router here, run the client process against it and the worker; the summary."""
    from shoal.router.app import create_app
    from shoal.router.config import RouterConfig
    from shoal.router.host import RouterHost
    from shoal.router.worker_client import GrpcWorkerClient
    from shoal.router.worker_pool import make_pool

    config = RouterConfig(served_model_name="bench", placement="round_robin")
    pool = make_pool(config)
    routed = TimedHandle(GrpcWorkerClient("bench-worker", endpoint))
    pool.add(routed)
    app = create_app(config, pool, tokenizer)
    # The host that shoal serve runs. IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that
    # say so; without it the first SSE chunk after the headers waits for the client's delayed ACK
    # (~40 ms, Nagle). nodelay=False makes such a socket to show that cost.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP if nodelay else 0)
    sock.bind(("127.0.0.1", 0))
    host = RouterHost(app, sock=sock)
    try:
        await host.start(60)
        texts = prompts(cfg.warmup + cfg.requests, cfg.prompt_words)
        job = {"url": host.url, "endpoint": endpoint, "texts": texts,
               "ids": [tokenizer.encode(t) for t in texts],  # what the router's tokenizer makes of them
               "max_tokens": cfg.max_tokens, "client": cfg.client}
        records = await run_client_process(job)
        summary = summarize(collect(records, routed.calls, cfg.warmup))
        if cfg.client == "httpx":  # not the router's: httpx's own request building, before its first byte
            build = [(r["t0"] - r["t_call"]) * 1e-9 for r in records
                     if r["path"] == "router" and r["index"] >= cfg.warmup]
            summary["client_build_ms"] = {f"p{p:g}": percentile(build, p) * 1e3 for p in PERCENTILES}
        return summary
    finally:
        await host.stop()
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
    from shoal.workers.models.files import smollm2_path, tokenizer_path as model_tokenizer
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
    if "client_build_ms" in result:
        lines.append("not counted above: the client's request building before its first byte, "
                     + ", ".join(f"{k} {v:.3f} ms" for k, v in result["client_build_ms"].items()))
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
    p.add_argument("--client", choices=CLIENTS, default="raw",
                   help="the router path's HTTP client: raw (a lean SSE client that stamps bytes as they "
                        "arrive) or httpx (counts its response handling as router time) (default: %(default)s)")
    p.add_argument("--no-nodelay", dest="nodelay", action="store_false",
                   help="bind the router's socket with proto 0 (no TCP_NODELAY), as shoal serve's bind_socket does")
    p.add_argument("--result-file", default=None)


def run_from_args(args: argparse.Namespace) -> dict:
    cfg = RouterBenchConfig(requests=args.requests, warmup=args.warmup, max_tokens=args.max_tokens,
                            prompt_words=args.prompt_words, client=args.client)
    result = run(cfg, args.model, args.tokenizer, args.device, nodelay=args.nodelay)
    payload = {"benchmark": "router", "env": environment(), "config": asdict(cfg),
               "worker": "shoal.workers.server process over gRPC on 127.0.0.1",
               "client": f"a separate process ({cfg.client} to the router, GrpcWorkerClient direct); "
                         "CLOCK_MONOTONIC stamps",
               "tcp_nodelay": args.nodelay,
               "model": args.model or "tiny (2 layers, hidden 64, SmolLM2 vocabulary, dummy weights)", **result}
    print(format_report(result))
    write_json(args.result_file, payload)
    return payload
