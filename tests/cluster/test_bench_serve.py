"""``shoal bench serve`` against a tiny real OpenAI-compatible SSE server (uvicorn on 127.0.0.1) that
streams deterministic fake tokens with controlled delays and a fake prefix cache; and the datasets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from shoal.cluster.bench.datasets import DatasetConfig, Session, Turn, build_sessions, ids_to_text
from shoal.cluster.bench.serve import (BenchConfig, BenchResult, RequestResult, add_arguments,
                                       arrival_offsets, meets_slos, percentile, run_benchmark,
                                       run_from_args, summarize)

MODEL = "fake-model"
BLOCK = 16


class FakeLLM:
    """Streams ``max_tokens`` tokens " t0", " t1", ...: the first after ``ttft`` s, then one per ``itl`` s.

    ``cached_tokens`` is the longest prefix (whole blocks, leaving one token) shared with an earlier
    prompt, as a prefix-caching engine reports it. Records each request's arrival and body.
    """

    def __init__(self, ttft: float = 0.05, itl: float = 0.005):
        self.ttft, self.itl = ttft, itl
        self.reset()

    def reset(self, ttft: float | None = None, itl: float | None = None, hold: int = 0) -> None:
        """``hold``: a stream sends nothing until that many are in flight at once (a barrier), so a
        test of concurrency sees the overlap it asks for however slowly the client's requests arrive."""
        self.ttft = self.ttft if ttft is None else ttft
        self.itl = self.itl if itl is None else itl
        self.hold = hold
        self._gate: asyncio.Condition | None = None  # made on the server's loop, at first use
        self.arrivals: list[float] = []
        self.bodies: list[dict] = []
        self.session_headers: list[str | None] = []
        self.seen: list[list] = []
        self.in_flight = self.peak = 0

    def cached(self, tokens: list) -> int:
        best = 0
        for old in self.seen:
            n = 0
            while n < min(len(old), len(tokens)) and old[n] == tokens[n]:
                n += 1
            best = max(best, n)
        self.seen.append(tokens)
        return min(best, len(tokens) - 1) // BLOCK * BLOCK

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        async def complete(request: Request, chat: bool):
            self.arrivals.append(time.perf_counter())
            body = await request.json()
            self.bodies.append(body)
            self.session_headers.append(request.headers.get("x-session-id"))
            if body.get("model") != MODEL:
                return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found"}}, 404)
            if chat:
                tokens = " ".join(f"{m['role']}: {m['content']}" for m in body["messages"]).split()
            else:
                prompt = body["prompt"]
                tokens = list(prompt) if isinstance(prompt, list) else prompt.split()
            return StreamingResponse(self.stream(body, chat, tokens), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await complete(request, chat=True)

        return app

    async def stream(self, body: dict, chat: bool, tokens: list):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self._barrier()
            cached = self.cached(tokens)
            if chat:  # a role-only first chunk, as OpenAI sends: not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(self.ttft)
            n = body["max_tokens"]
            for i in range(n):
                piece = f" t{i}"
                choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                choice["finish_reason"] = "length" if i == n - 1 else None
                yield _sse({"choices": [choice]})
                if i < n - 1:
                    await asyncio.sleep(self.itl)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"choices": [], "usage": {
                    "prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n,
                    "prompt_tokens_details": {"cached_tokens": cached}}})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


    async def _barrier(self) -> None:
        if self._gate is None:
            self._gate = asyncio.Condition()
        async with self._gate:
            self._gate.notify_all()
            # Bounded, so a client that never reaches `hold` fails the test's asserts instead of hanging.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gate.wait_for(lambda: self.in_flight >= self.hold), 30)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def server():
    fake = FakeLLM()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake(server):
    server.reset(ttft=0.05, itl=0.005)
    return server


def run(sessions, **cfg) -> tuple[BenchResult, dict]:
    bench = asyncio.run(run_benchmark(sessions, BenchConfig(**cfg)))
    return bench, summarize(bench)


# -- against the server -------------------------------------------------------------------------------

def test_metrics_follow_the_servers_delays(fake):
    fake.reset(ttft=0.08, itl=0.01)
    sessions = build_sessions(DatasetConfig("random", num_prompts=8, input_len=32, output_len=10))
    bench, s = run(sessions, base_url=fake.url)  # model from /v1/models
    assert bench.model == MODEL and s["completed"] == 8 and s["failed"] == 0
    assert s["total_input_tokens"] == 8 * 32 and s["total_output_tokens"] == 80
    assert 80 <= s["ttft_ms"]["mean"] < 80 + 150
    assert 9 <= s["tpot_ms"]["median"] < 40 and 9 <= s["itl_ms"]["median"] < 40
    assert all(len(r.itl) == 9 for r in bench.results)
    assert s["e2el_ms"]["p99"] >= 80 + 9 * 10
    assert s["output_throughput"] == pytest.approx(80 / s["duration_s"])
    # what went on the wire: token ids, controlled output length, the session id as `user`
    for body in fake.bodies:
        assert len(body["prompt"]) == 32 and all(isinstance(t, int) for t in body["prompt"])
        assert body["max_tokens"] == 10 and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    assert sorted(b["user"] for b in fake.bodies) == sorted(x.session_id for x in sessions)


def test_max_concurrency_caps_requests_in_flight(fake):
    # The fake holds every stream until `hold` are in flight: the peak is what the client allows,
    # not what the machine's scheduling happens to overlap.
    fake.reset(ttft=0.2, itl=0.001, hold=3)
    sessions = build_sessions(DatasetConfig("random", num_prompts=9, input_len=8, output_len=2))
    bench, s = run(sessions, base_url=fake.url, model=MODEL, max_concurrency=3)
    assert s["completed"] == 9
    assert fake.peak == 3 and bench.max_in_flight == 3
    assert s["duration_s"] >= 3 * 0.2  # three waves
    fake.reset(hold=9)
    bench, _ = run(sessions, base_url=fake.url, model=MODEL)  # no cap, infinite rate: all at once
    assert fake.peak == 9 and bench.max_in_flight == 9


def test_request_rate_spaces_arrivals_on_the_seeded_schedule(fake):
    fake.reset(ttft=0.005, itl=0.001)
    sessions = build_sessions(DatasetConfig("random", num_prompts=12, input_len=8, output_len=2))
    bench, s = run(sessions, base_url=fake.url, model=MODEL, request_rate=30.0, seed=3)
    planned = arrival_offsets(12, 30.0, 1.0, random.Random(3))
    sent = sorted(r.start for r in bench.results)
    assert len(sent) == 12 and s["completed"] == 12
    for want, got in zip(planned, sent):
        assert want <= got <= want + 0.5, (planned, sent)  # never early; late only by loop delays
    assert max(fake.arrivals) - min(fake.arrivals) >= planned[-1] - 0.05  # spread, not a burst
    assert s["duration_s"] >= planned[-1]


def test_goodput_counts_requests_within_every_slo(fake):
    sessions = build_sessions(DatasetConfig("random", num_prompts=6, input_len=8, output_len=5))
    _, s = run(sessions, base_url=fake.url, model=MODEL, goodput_slos_ms=(("ttft", 2000.0), ("tpot", 500.0)))
    assert s["goodput"]["good_requests"] == 6
    assert s["goodput"]["request_goodput"] == pytest.approx(6 / s["duration_s"])
    _, s = run(sessions, base_url=fake.url, model=MODEL, goodput_slos_ms=(("ttft", 2000.0), ("e2el", 1.0)))
    assert s["goodput"]["good_requests"] == 0


def test_meets_slos_rules():
    ok = RequestResult("a", 0, 8, success=True, output_tokens=3, ttft=0.1, e2e=0.3)  # tpot 100 ms
    assert meets_slos(ok, (("ttft", 100.0), ("tpot", 100.0), ("e2el", 300.0)))
    assert not meets_slos(ok, (("tpot", 99.0),))
    one = RequestResult("b", 0, 8, success=True, output_tokens=1, ttft=0.1, e2e=0.1)
    assert one.tpot is None and meets_slos(one, (("tpot", 1.0),))  # no TPOT to miss
    failed = RequestResult("c", 0, 8, success=False, error="HTTP 500")
    assert not meets_slos(failed, ())


def test_shared_prefix_reports_the_servers_cache_hits(fake):
    cfg = DatasetConfig("shared-prefix", num_groups=2, prompts_per_group=4, prefix_len=64, suffix_len=16,
                        output_len=3, seed=1)
    _, s = run(build_sessions(cfg), base_url=fake.url, model=MODEL, max_concurrency=1)
    # the first prompt of each group misses, the other three hit the 64-token prefix
    assert s["cached_tokens"] == 6 * 64
    assert s["prefix_hit_rate"] == pytest.approx(6 * 64 / (8 * 80))


def test_multi_turn_chat_resends_the_growing_history(fake):
    cfg = DatasetConfig("multi-turn", num_prompts=2, num_turns=3, input_len=40, output_len=4,
                        prompt_format="text")
    _, s = run(build_sessions(cfg), base_url=fake.url, model=MODEL, endpoint="/v1/chat/completions")
    assert s["completed"] == 6 and s["total_output_tokens"] == 24
    assert s["ttft_ms"]["median"] >= 50  # the role-only chunk is not a token
    by_user: dict[str, list[list[dict]]] = {}
    for body in fake.bodies:
        by_user.setdefault(body["user"], []).append(body["messages"])
    assert sorted(by_user) == ["conversation-0", "conversation-1"]
    for turns in by_user.values():
        assert [len(m) for m in turns] == [1, 3, 5]
        assert turns[2][:3] == turns[1]  # the history is re-sent as it was
        assert turns[1][1] == {"role": "assistant", "content": " t0 t1 t2 t3"}  # the real reply
    assert s["prefix_hit_rate"] > 0.3  # later turns hit the earlier turns' prefix


def test_without_usage_tokens_are_counted_from_chunks(fake):
    sessions = build_sessions(DatasetConfig("random", num_prompts=3, input_len=8, output_len=6,
                                            prompt_format="text"))
    _, s = run(sessions, base_url=fake.url, model=MODEL, session_key="header",
               extra_body=(("stream_options", {"include_usage": False}),))
    assert s["completed"] == 3 and s["total_output_tokens"] == 18
    assert s["total_input_tokens"] == 24 and s["prefix_hit_rate"] is None
    assert all(isinstance(b["prompt"], str) and len(b["prompt"].split()) == 8 for b in fake.bodies)
    assert all("user" not in b for b in fake.bodies)  # the session id went as a header instead
    assert sorted(fake.session_headers) == sorted(x.session_id for x in sessions)


def test_server_errors_are_recorded_not_raised(fake, tmp_path, capsys):
    sessions = build_sessions(DatasetConfig("random", num_prompts=3, input_len=8, output_len=2))
    _, s = run(sessions, base_url=fake.url, model="nope")
    assert s["completed"] == 0 and s["failed"] == 3
    assert s["errors"] and "HTTP 404" in s["errors"][0] and "not found" in s["errors"][0]
    assert math.isnan(s["ttft_ms"]["mean"])
    with pytest.raises(ValueError, match="cannot list models"):
        run(sessions, base_url="http://127.0.0.1:9", timeout_s=2.0)  # nothing listens on port 9


def test_run_from_args_prints_writes_json_and_plots(fake, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    result, plot = tmp_path / "result.json", tmp_path / "cdf.png"
    args = parser.parse_args([
        "--base-url", fake.url, "--dataset", "shared-prefix", "--num-groups", "2", "--prompts-per-group", "3",
        "--prefix-len", "32", "--suffix-len", "8", "--output-len", "4", "--request-rate", "200",
        "--max-concurrency", "4", "--goodput", "ttft:5000", "tpot:1000", "--api-key", "sk-secret",
        "--result-file", str(result), "--save-detailed", "--plot", str(plot)])
    assert run_from_args(args) == 0
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out and "P99 ITL (ms):" in out
    doc = json.loads(result.read_text())
    assert doc["summary"]["completed"] == 6 and doc["summary"]["goodput"]["good_requests"] == 6
    assert doc["config"]["api_key"] == "<redacted>" and "sk-secret" not in result.read_text()
    assert doc["dataset"]["prompt_format"] == "ids" and len(doc["requests"]) == 6
    assert all(len(r["itl"]) == 3 and r["tpot"] > 0 for r in doc["requests"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = parser.parse_args(["--base-url", fake.url, "--model", "nope", "--num-prompts", "2"])
    assert run_from_args(bad) == 1


# -- arrivals, statistics, configs --------------------------------------------------------------------

def test_arrival_offsets():
    assert arrival_offsets(5, math.inf, 1.0, random.Random(0)) == [0.0] * 5
    poisson = arrival_offsets(4000, 10.0, 1.0, random.Random(0))
    gaps = np.diff(poisson)
    assert poisson[0] == 0.0 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV = 1
    bursty = np.diff(arrival_offsets(4000, 10.0, 0.25, random.Random(0)))
    assert bursty.mean() == pytest.approx(0.1, rel=0.1)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.25)  # gamma: CV^2 = 1/shape
    assert arrival_offsets(50, 3.0, 2.0, random.Random(5)) == arrival_offsets(50, 3.0, 2.0, random.Random(5))


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(percentile([], 50))


def test_bench_config_validation():
    with pytest.raises(ValueError, match="endpoint must be one of"):
        BenchConfig(endpoint="/v1/embeddings")
    with pytest.raises(ValueError, match="request_rate must be > 0"):
        BenchConfig(request_rate=0)
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        BenchConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="goodput_slos_ms"):
        BenchConfig(goodput_slos_ms=(("latency", 5.0),))


# -- datasets -----------------------------------------------------------------------------------------

def test_random_dataset_lengths_and_seeds():
    exact = build_sessions(DatasetConfig("random", num_prompts=20, input_len=50, output_len=7))
    assert all(len(s.turns[0].prompt) == 50 == s.turns[0].prompt_len and s.turns[0].output_len == 7
               for s in exact)
    ranged = build_sessions(DatasetConfig("random", num_prompts=200, input_len=100, output_len=40,
                                          range_ratio=0.5, token_id_range=(10, 20)))
    ins = [len(s.turns[0].prompt) for s in ranged]
    outs = [s.turns[0].output_len for s in ranged]
    assert min(ins) >= 50 and max(ins) <= 150 and len(set(ins)) > 20
    assert min(outs) >= 20 and max(outs) <= 60
    assert all(10 <= t < 20 for s in ranged for t in s.turns[0].prompt)
    again = build_sessions(DatasetConfig("random", num_prompts=20, input_len=50, output_len=7))
    other = build_sessions(DatasetConfig("random", num_prompts=20, input_len=50, output_len=7, seed=1))
    assert again == exact and other != exact


def test_shared_prefix_dataset_really_shares_prefixes():
    cfg = DatasetConfig("shared-prefix", num_groups=3, prompts_per_group=5, prefix_len=40, suffix_len=10)
    sessions = build_sessions(cfg)
    assert len(sessions) == 15 and len({s.session_id for s in sessions}) == 15
    groups: dict[str, list[tuple]] = {}
    for s in sessions:
        prompt = s.turns[0].prompt
        assert len(prompt) == 50
        groups.setdefault(s.session_id.split("-")[1], []).append(prompt)
    heads = set()
    for prompts in groups.values():
        assert len({p[:40] for p in prompts}) == 1  # one prefix per group
        assert len({p[40:] for p in prompts}) == 5  # unique suffixes
        heads.add(prompts[0][:40])
    assert len(heads) == 3
    assert [s.session_id for s in sessions[:5]] != sorted(s.session_id for s in sessions)[:5]  # shuffled
    text = build_sessions(DatasetConfig("shared-prefix", num_groups=3, prompts_per_group=5, prefix_len=40,
                                        suffix_len=10, prompt_format="text"))
    for s_ids, s_txt in zip(sessions, text):
        assert s_txt.turns[0].prompt == ids_to_text(s_ids.turns[0].prompt)
        assert len(s_txt.turns[0].prompt.split()) == 50


def test_multi_turn_and_sharegpt_datasets(tmp_path):
    conv = build_sessions(DatasetConfig("multi-turn", num_prompts=3, num_turns=4, input_len=10,
                                        output_len=5, prompt_format="text"))
    assert len(conv) == 3 and all(len(s.turns) == 4 for s in conv)
    assert all(isinstance(t.prompt, str) and len(t.prompt.split()) == 10 for s in conv for t in s.turns)
    with pytest.raises(ValueError, match="prompt_format must be 'text' for multi-turn"):
        DatasetConfig("multi-turn", prompt_format="ids")

    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "Tell me about the sea. " * 4},
                                      {"from": "gpt", "value": "The sea is large and salty. " * 10}]},
        {"id": "b", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello " * 9}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Only a question, no answer here."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    picked = build_sessions(DatasetConfig("sharegpt", num_prompts=3, path=str(path), prompt_format="text"))
    assert [s.turns[0] for s in picked] == [Turn("Tell me about the sea. " * 4, 23, 70)] * 3  # b, c filtered
    with pytest.raises(ValueError, match="is not a file"):
        build_sessions(DatasetConfig("sharegpt", path=str(tmp_path / "missing.json"), prompt_format="text"))
    with pytest.raises(ValueError, match="dataset name must be one of"):
        DatasetConfig("sonnet")
    assert isinstance(conv[0], Session)


def test_percentiles_are_reported_as_configured(fake):
    sessions = build_sessions(DatasetConfig("random", num_prompts=4, input_len=8, output_len=3))
    _, s = run(sessions, base_url=fake.url, model=MODEL, percentiles=(25.0, 99.9))
    assert set(s["ttft_ms"]) == {"mean", "median", "p25", "p99.9"}
    assert s["ttft_ms"]["p25"] <= s["ttft_ms"]["median"] <= s["ttft_ms"]["p99.9"]
