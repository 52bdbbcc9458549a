"""``shoal bench serve``: an open-loop load generator for any OpenAI-compatible server (shoal, vLLM,
SGLang).

Sessions (:mod:`.datasets`) start on a seeded arrival schedule (Poisson, gamma with ``burstiness``, or
all at once); ``max_concurrency`` caps the requests in flight. Each request streams (SSE) and is timed
on the client: TTFT (send -> first content chunk), ITL (gap between content chunks: one token each on
vLLM, SGLang and shoal), TPOT ((e2e - ttft) / (output_tokens - 1)), e2e. Output tokens come from the
final chunk's ``usage`` (``stream_options.include_usage``), else from the number of content chunks; the
server's ``usage.prompt_tokens_details.cached_tokens`` gives the prefix-cache hit rate it saw.

    result = asyncio.run(run_benchmark(build_sessions(DatasetConfig(...)), BenchConfig(...)))
    print(format_report(result))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .datasets import DATASETS, DatasetConfig, Session, Turn, build_sessions, ids_to_text
from .sse import sse_lines

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    request_rate: float = math.inf  # sessions started per second; inf: all at once
    burstiness: float = 1.0  # gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 smoother
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True  # so output lengths are what the dataset asks (vLLM / SGLang / shoal)
    temperature: float = 0.0
    session_key: str = "user"  # how a session id reaches the router: "user" field, "header", "none"
    timeout_s: float = 600.0
    goodput_slos_ms: tuple[tuple[str, float], ...] = ()  # (("ttft", 500.0), ("tpot", 50.0))
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    extra_body: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, limit: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {limit}, got {getattr(self, name)!r}")

        check(self.endpoint in ENDPOINTS, "endpoint", f"one of {list(ENDPOINTS)}")
        check(self.request_rate > 0, "request_rate", "> 0 (or inf)")
        check(0 < self.burstiness < math.inf, "burstiness", "> 0")
        check(self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency", ">= 1")
        check(self.session_key in ("user", "header", "none"), "session_key", "'user', 'header' or 'none'")
        check(self.timeout_s > 0, "timeout_s", "> 0")
        check(all(k in SLO_KEYS and v > 0 for k, v in self.goodput_slos_ms), "goodput_slos_ms",
              f"pairs (key, ms > 0) with key in {list(SLO_KEYS)}")
        check(all(0 < p <= 100 for p in self.percentiles), "percentiles", "in (0, 100]")

    @property
    def chat(self) -> bool:
        return self.endpoint == "/v1/chat/completions"


@dataclass
class RequestResult:
    session_id: str
    turn: int
    prompt_len: int  # the dataset's count (exact for token ids, an estimate for text)
    success: bool = False
    error: str = ""
    prompt_tokens: int | None = None  # the server's usage
    output_tokens: int = 0
    cached_tokens: int | None = None
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0  # seconds since the benchmark began
    text: str = field(default="", repr=False)  # the reply; multi-turn sends it back as history

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- arrivals -----------------------------------------------------------------------------------------

def arrival_offsets(n: int, request_rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Start times (seconds from the beginning) of ``n`` sessions.

    Gaps are gamma distributed with shape ``burstiness`` and mean ``1 / request_rate`` (shape 1 is the
    exponential: a Poisson process). The first session starts at 0.
    """
    if math.isinf(request_rate):
        return [0.0] * n
    scale = 1.0 / (request_rate * burstiness)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, scale)
    return out


# -- one request --------------------------------------------------------------------------------------

def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or ""


def _request_body(cfg: BenchConfig, model: str, turn: Turn, history: list[dict], session_id: str) -> dict:
    body: dict = {"model": model, "max_tokens": turn.output_len, "temperature": cfg.temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.session_key == "user":
        body["user"] = session_id
    text = turn.prompt if isinstance(turn.prompt, str) else None
    if cfg.chat:
        body["messages"] = history + [{"role": "user", "content": text or ids_to_text(turn.prompt)}]
    elif history:  # a conversation on the completions endpoint: the history as plain text
        past = "".join(f"{m['role']}: {m['content']}\n" for m in history)
        body["prompt"] = f"{past}user: {text}\nassistant:"
    else:
        body["prompt"] = text if text is not None else list(turn.prompt)
    body.update(dict(cfg.extra_body))
    return body


async def send_request(client: httpx.AsyncClient, cfg: BenchConfig, body: dict, result: RequestResult,
                       headers: dict) -> RequestResult:
    """Stream one request and time it into ``result``; errors are recorded, never raised."""
    pieces: list[str] = []
    usage: dict | None = None
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", cfg.endpoint, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}"
                return result
            async for line in sse_lines(resp):
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"stream error: {chunk['error']}"
                    return result
                usage = chunk.get("usage") or usage
                piece = _chunk_text(chunk, cfg.chat)
                if piece:
                    now = time.perf_counter()
                    if not pieces:
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    last = now
                    pieces.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - t0
    result.text = "".join(pieces)
    result.output_tokens = len(pieces)
    if usage:
        result.output_tokens = usage.get("completion_tokens") or result.output_tokens
        result.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")
    result.success = result.output_tokens > 0
    if not result.success:
        result.error = "the stream carried no output"
    return result


# -- the run ------------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    config: BenchConfig
    results: list[RequestResult]
    duration: float
    max_in_flight: int
    model: str


async def discover_model(client: httpx.AsyncClient) -> str:
    try:
        resp = await client.get("/v1/models")
        resp.raise_for_status()
        models = resp.json().get("data") or []
    except (httpx.HTTPError, ValueError) as e:
        raise ValueError(f"cannot list models at {client.base_url}v1/models ({e}); is the server up? "
                         f"or pass --model") from e
    if not models:
        raise ValueError("the server lists no models at /v1/models; pass --model")
    return models[0]["id"]


async def run_benchmark(sessions: list[Session], cfg: BenchConfig) -> BenchResult:
    offsets = arrival_offsets(len(sessions), cfg.request_rate, cfg.burstiness, random.Random(cfg.seed))
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    in_flight = peak = 0
    results: list[RequestResult] = []

    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=httpx.Timeout(cfg.timeout_s),
                                 limits=limits, headers=headers) as client:
        model = cfg.model or await discover_model(client)
        start = time.perf_counter()

        async def one(turn_no: int, session: Session, history: list[dict]) -> RequestResult:
            nonlocal in_flight, peak
            turn = session.turns[turn_no]
            body = _request_body(cfg, model, turn, history, session.session_id)
            extra = {"X-Session-ID": session.session_id} if cfg.session_key == "header" else {}
            result = RequestResult(session.session_id, turn_no, turn.prompt_len)
            in_flight += 1
            peak = max(peak, in_flight)
            result.start = time.perf_counter() - start
            try:
                return await send_request(client, cfg, body, result, extra)
            finally:
                in_flight -= 1

        async def run_session(session: Session, offset: float) -> None:
            await asyncio.sleep(max(0.0, offset - (time.perf_counter() - start)))
            history: list[dict] = []
            for k, turn in enumerate(session.turns):
                if gate is None:
                    result = await one(k, session, history)
                else:
                    async with gate:
                        result = await one(k, session, history)
                results.append(result)
                if not result.success:
                    return  # a conversation cannot go on without its reply
                user = turn.prompt if isinstance(turn.prompt, str) else ids_to_text(turn.prompt)
                history += [{"role": "user", "content": user}, {"role": "assistant", "content": result.text}]

        await asyncio.gather(*(run_session(s, o) for s, o in zip(sessions, offsets)))
        duration = time.perf_counter() - start
    results.sort(key=lambda r: r.start)
    return BenchResult(cfg, results, duration, peak, model)


# -- metrics ------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats_ms(values: list[float], percentiles: tuple[float, ...]) -> dict:
    ms = [v * 1000.0 for v in values]
    out = {"mean": sum(ms) / len(ms) if ms else math.nan, "median": percentile(ms, 50)}
    out.update({f"p{p:g}": percentile(ms, p) for p in percentiles if p != 50})  # p50 is the median
    return out


def meets_slos(r: RequestResult, slos_ms: tuple[tuple[str, float], ...]) -> bool:
    """A successful request within every SLO; TPOT is undefined (so met) for one output token."""
    if not r.success:
        return False
    measured = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    return all(measured[k] is None or measured[k] * 1000.0 <= limit for k, limit in slos_ms)


def summarize(bench: BenchResult) -> dict:
    cfg, done = bench.config, [r for r in bench.results if r.success]
    dur = bench.duration
    prompt_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    reported = [r for r in done if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens for r in reported)
    summary = {
        "model": bench.model, "completed": len(done), "failed": len(bench.results) - len(done),
        "duration_s": dur, "max_in_flight": bench.max_in_flight,
        "total_input_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / dur if dur else math.nan,
        "output_throughput": output_tokens / dur if dur else math.nan,
        "total_token_throughput": (prompt_tokens + output_tokens) / dur if dur else math.nan,
        "cached_tokens": cached if reported else None,
        "prefix_hit_rate": cached / sum(r.prompt_tokens for r in reported) if reported else None,
        "ttft_ms": _stats_ms([r.ttft for r in done], cfg.percentiles),
        "tpot_ms": _stats_ms([r.tpot for r in done if r.tpot is not None], cfg.percentiles),
        "itl_ms": _stats_ms([x for r in done for x in r.itl], cfg.percentiles),
        "e2el_ms": _stats_ms([r.e2e for r in done], cfg.percentiles),
        "errors": sorted({r.error for r in bench.results if r.error})[:5],
    }
    if cfg.goodput_slos_ms:
        good = sum(meets_slos(r, cfg.goodput_slos_ms) for r in bench.results)
        summary["goodput"] = {"slos_ms": dict(cfg.goodput_slos_ms), "good_requests": good,
                              "request_goodput": good / dur if dur else math.nan}
    return summary


# -- report -------------------------------------------------------------------------------------------

def format_report(summary: dict) -> str:
    def row(label: str, value) -> str:
        if value is None:
            value = "n/a"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        return f"{label:<42}{value:>12}"

    lines = ["{:=^54}".format(" Serving Benchmark Result "),
             row("Model:", summary["model"]),
             row("Successful requests:", summary["completed"]),
             row("Failed requests:", summary["failed"]),
             row("Peak requests in flight:", summary["max_in_flight"]),
             row("Benchmark duration (s):", summary["duration_s"]),
             row("Total input tokens:", summary["total_input_tokens"]),
             row("Total generated tokens:", summary["total_output_tokens"]),
             row("Request throughput (req/s):", summary["request_throughput"]),
             row("Output token throughput (tok/s):", summary["output_throughput"]),
             row("Total token throughput (tok/s):", summary["total_token_throughput"]),
             row("Server-reported cached tokens:", summary["cached_tokens"]),
             row("Prefix cache hit rate:", summary["prefix_hit_rate"])]
    if "goodput" in summary:
        lines += [row("Good requests (within SLOs):", summary["goodput"]["good_requests"]),
                  row("Request goodput (req/s):", summary["goodput"]["request_goodput"])]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append("{:-^54}".format(f" {title} "))
        lines += [row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} "
                      f"{key.split('_')[0].upper()} (ms):", value) for stat, value in summary[key].items()]
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    lines.append("=" * 54)
    return "\n".join(lines)


def write_json(path: str, bench: BenchResult, summary: dict, dataset: DatasetConfig | None = None,
               detailed: bool = False) -> None:
    config = asdict(bench.config) | {"api_key": "<redacted>" if bench.config.api_key else None}
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
           "dataset": asdict(dataset) if dataset else None, "summary": summary}
    if detailed:
        doc["requests"] = [{k: v for k, v in asdict(r).items() if k != "text"} | {"tpot": r.tpot}
                           for r in bench.results]
    # json has no inf / nan: write them as null (an unlimited rate, an empty statistic)
    Path(path).write_text(json.dumps(_finite(doc), indent=2) + "\n")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def plot_cdfs(path: str, bench: BenchResult) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) as one PNG; matplotlib is imported only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in bench.results if r.success]
    series = {"TTFT": [r.ttft for r in done], "TPOT": [r.tpot for r in done if r.tpot is not None],
              "ITL": [x for r in done for x in r.itl], "E2E latency": [r.e2e for r in done]}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items()):
        xs = sorted(v * 1000.0 for v in values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{bench.model} @ {bench.config.base_url}{bench.config.endpoint}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------------

def _slo(text: str) -> tuple[str, float]:
    key, sep, ms = text.partition(":")
    if not sep or key not in SLO_KEYS:
        raise argparse.ArgumentTypeError(f"--goodput takes KEY:MS with KEY in {list(SLO_KEYS)}, got {text!r}")
    return key, float(ms)


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="default: %(default)s")
    s.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    s.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    s.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    s.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", default="random", choices=DATASETS)
    d.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (--dataset sharegpt)")
    d.add_argument("--num-prompts", type=int, default=100, help="requests, or conversations for multi-turn")
    d.add_argument("--input-len", type=int, default=256)
    d.add_argument("--output-len", type=int, default=128)
    d.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in L*(1-r)..L*(1+r)")
    d.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens shared by a group")
    d.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: unique tokens per prompt")
    d.add_argument("--num-groups", type=int, default=8)
    d.add_argument("--prompts-per-group", type=int, default=16)
    d.add_argument("--num-turns", type=int, default=4, help="multi-turn: user turns per conversation")
    d.add_argument("--prompt-format", default="auto", choices=("auto", "ids", "text"),
                   help="auto: token ids for single-turn /v1/completions, text otherwise")
    d.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 20000), metavar=("LOW", "HIGH"))
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf, help="sessions/s (default: inf, all at once)")
    t.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    t.add_argument("--max-concurrency", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (servers that reject unknown fields)")
    t.add_argument("--session-key", default="user", choices=("user", "header", "none"),
                   help="send each session's id as the OpenAI `user` field or an X-Session-ID header")
    t.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    r = p.add_argument_group("report")
    r.add_argument("--goodput", nargs="+", type=_slo, default=[], metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2el)")
    r.add_argument("--percentiles", default="50,90,99", help="comma-separated (default: %(default)s)")
    r.add_argument("--result-file", default=None, help="write the summary (and config) as JSON here")
    r.add_argument("--save-detailed", action="store_true", help="also write every request's timings")
    r.add_argument("--plot", default=None, help="write latency CDFs to this PNG (needs matplotlib)")


def configs_from_args(args: argparse.Namespace) -> tuple[DatasetConfig, BenchConfig]:
    fmt = args.prompt_format
    if fmt == "auto":
        single_turn = args.dataset in ("random", "shared-prefix")
        fmt = "ids" if single_turn and args.endpoint == "/v1/completions" else "text"
    dataset = DatasetConfig(
        name=args.dataset, num_prompts=args.num_prompts, seed=args.seed, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, prefix_len=args.prefix_len,
        suffix_len=args.suffix_len, num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
        num_turns=args.num_turns, path=args.dataset_path, prompt_format=fmt,
        token_id_range=tuple(args.token_id_range))
    bench = BenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
        ignore_eos=args.ignore_eos, temperature=args.temperature, session_key=args.session_key,
        timeout_s=args.timeout, goodput_slos_ms=tuple(args.goodput),
        percentiles=tuple(float(x) for x in args.percentiles.split(",") if x.strip()),
        extra_body=tuple(args.extra_body.items()))
    return dataset, bench


def run_from_args(args: argparse.Namespace) -> int:
    """The CLI entry: 0 when at least one request completed, 1 otherwise."""
    dataset, cfg = configs_from_args(args)
    sessions = build_sessions(dataset)
    bench = asyncio.run(run_benchmark(sessions, cfg))
    summary = summarize(bench)
    print(format_report(summary))
    if args.result_file:
        write_json(args.result_file, bench, summary, dataset, detailed=args.save_detailed)
    if args.plot:
        plot_cdfs(args.plot, bench)
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
