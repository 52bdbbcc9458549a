"""``shoal bench router``: its arithmetic, and one small real run (a worker process, the router on uvicorn)."""

from __future__ import annotations

import json
import math

import pytest

from shoal.cluster.bench.router import RouterBenchConfig, Sample, percentile, summarize
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


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="requests must be >= 1"):
        RouterBenchConfig(requests=0)


def test_a_small_real_run_writes_its_json(tmp_path, capsys):
    assert "router" in build_parser().parse_args(["bench", "router"]).bench
    out = tmp_path / "router.json"
    assert main(["bench", "router", "--requests", "2", "--warmup", "1", "--max-tokens", "3",
                 "--prompt-words", "4", "--result-file", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "router" and data["router_requests"] == data["direct_requests"] == 2
    assert data["router_requests_aligned"] == 2 and data["tokens_per_request"] == 3
    rows = {r["metric"]: r for r in data["rows"]}
    assert rows["out"]["samples"] == 6
    # The router does some work each way; the direct path hands over at once.
    assert rows["in"]["router_p50_ms"] > 0 and rows["in"]["direct_p50_ms"] < rows["in"]["router_p50_ms"]
    assert "router overhead" in capsys.readouterr().out
