"""``shoal bench router``: its arithmetic, its lean SSE client, and small real runs (a worker process, the
router on uvicorn, the client in a process of its own)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from shoal.cluster.bench.router import (Call, RouterBenchConfig, Sample, SSEConnection, collect, percentile,
                                        summarize, to_sample)
from shoal.cluster.cli import build_parser, main


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0], 99) == 1.0
    assert math.isnan(percentile([], 50))


def test_summary_reports_router_minus_direct():
    router = [Sample("router", ttft=0.010 + i * 1e-3, e2e=0.05, tokens=4, in_=0.002, out=[0.001] * 4, aligned=True)
              for i in range(3)]
    direct = [Sample("direct", ttft=0.007 + i * 1e-3, e2e=0.05, tokens=4, in_=0.0, out=[0.0] * 4, aligned=True)
              for i in range(3)]
    s = summarize([x for pair in zip(router, direct) for x in pair])
    rows = {r["metric"]: r for r in s["rows"]}
    assert rows["ttft"]["added_p50_ms"] == pytest.approx(3.0)
    assert rows["in"]["added_p50_ms"] == pytest.approx(2.0) and rows["out"]["samples"] == 12
    assert s["ttft_added_paired_ms"]["p99"] == pytest.approx(3.0)


def test_samples_come_from_two_processes_stamps_in_nanoseconds():
    call = Call("r0", sent=1_500_000, delta_times=[5_000_000, 7_000_000], delta_tokens=[1, 2])
    s = to_sample("router", 1_000_000, [5_400_000, 7_300_000], call)
    assert s.in_ == pytest.approx(0.5e-3) and s.ttft == pytest.approx(4.4e-3) and s.e2e == pytest.approx(6.3e-3)
    assert s.out == pytest.approx([0.4e-3, 0.3e-3]) and s.tokens == 3 and s.aligned
    # One chunk carried two deltas: no per-token pairing is possible.
    merged = to_sample("router", 1_000_000, [7_300_000], call)
    assert not merged.aligned and merged.out == []


def test_collect_pairs_router_records_with_the_handles_calls_and_drops_warmup():
    calls = [Call(f"r{i}", sent=10 * i + 2, delta_times=[10 * i + 5], delta_tokens=[1]) for i in range(2)]
    records = [{"index": i, "path": "router", "t0": 10 * i, "received": [10 * i + 6]} for i in range(2)]
    records.insert(1, {"index": 0, "path": "direct", "t0": 0, "received": [3],
                       "call": {"request_id": "d0", "sent": 0, "delta_times": [2], "delta_tokens": [1]}})
    samples = collect(records, calls, warmup=1)
    assert [s.path for s in samples] == ["router"] and samples[0].in_ == pytest.approx(2e-9)
    with pytest.raises(RuntimeError, match="2 router requests sent but 1 reached the worker"):
        collect(records, calls[:1], warmup=0)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="requests must be >= 1"):
        RouterBenchConfig(requests=0)
    with pytest.raises(ValueError, match="client must be one of"):
        RouterBenchConfig(client="curl")


def test_sse_connection_stamps_events_across_odd_splits_and_raises_on_an_error():
    """A real socket server answers in awkward pieces (a size line, an event and a chunk cut in two;
    two events in one chunk), then a 400 on the same keep-alive connection."""
    events = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\ndata: {"c": 3}\n\n', b"data: [DONE]\n\n"]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    stream = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + chunked)
    body = stream.index(b"\r\n\r\n") + 4
    # Cut inside the headers, the first size line ("10"), the first event, and that chunk's CRLF.
    cuts = [30, body + 1, stream.index(b'data: {"a"') + 2, stream.index(b"\n\n\r\n20") + 3]
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    error = b'{"error": {"message": "prompt: too long"}}'
    refusal = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(error), error)

    async def scenario():
        requests = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for reply in ([*pieces], [refusal]):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                requests.append(head + await reader.readexactly(length))
                for piece in reply:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        conn = await SSEConnection.open("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            t0 = await conn.post("/v1/completions", b'{"prompt": "hi"}')
            status = conn.status
            lines, received = list(conn.lines), list(conn.received)
            with pytest.raises(RuntimeError, match="router answered 400: .*prompt: too long"):
                await conn.post("/v1/completions", b"{}")
        finally:
            conn.close()
            server.close()
            await server.wait_closed()
        return t0, status, lines, received, requests

    t0, status, lines, received, requests = asyncio.run(scenario())
    assert status == 200 and lines == [b'data: {"a": 1}', b'data: {"b": 2}', b'data: {"c": 3}']
    assert t0 < received[0] <= received[1] == received[2]  # b and c arrived in one piece
    assert requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\n") and requests[0].endswith(b'{"prompt": "hi"}')


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_a_small_real_run_writes_its_json(tmp_path, capsys, client):
    assert "router" in build_parser().parse_args(["bench", "router"]).bench
    out = tmp_path / "router.json"
    assert main(["bench", "router", "--requests", "2", "--warmup", "1", "--max-tokens", "3",
                 "--prompt-words", "4", "--client", client, "--result-file", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "router" and data["router_requests"] == data["direct_requests"] == 2
    assert data["router_requests_aligned"] == 2 and data["tokens_per_request"] == 3
    assert data["config"]["client"] == client and ("client_build_ms" in data) == (client == "httpx")
    rows = {r["metric"]: r for r in data["rows"]}
    assert rows["out"]["samples"] == 6
    # The router does some work each way; the direct path hands over at once.
    assert rows["in"]["router_p50_ms"] > 0 and rows["in"]["direct_p50_ms"] < rows["in"]["router_p50_ms"]
    assert "router overhead" in capsys.readouterr().out
