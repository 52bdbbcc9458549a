"""``shoal bench kernels --gemv`` end to end on CPU: the interpreted kernel, a tiny shape grid and a
wall-clock timer stand in for the GPU, so the sweep, the summary, the JSON and the printed
GEMV_TABLE source are exercised in CI. The source it prints must be Python that rebuilds the table."""

from __future__ import annotations

import argparse
import json
import time

import torch

from shoal.cluster.bench import kernels as bench_kernels
from shoal.kernels import benchmark_gemv as bg
from shoal.kernels.gemv import GemvConfig


def _wall_timer(fn, reps):
    t = time.perf_counter()  # one call, not reps: the interpreter is slow and the number is not the point
    fn()
    return (time.perf_counter() - t) * 1e3


def _args(*argv):
    p = argparse.ArgumentParser()
    bench_kernels.add_arguments(p)
    return p.parse_args(list(argv))


def test_gemv_bench_path_on_cpu(tmp_path, capsys):
    shapes = [bg.GemvShape("tiny/qkv", "linear", 40, 64, bias=True),
              bg.GemvShape("tiny/gate_up+silu", "gate_up_silu", 32, 48)]
    grid = lambda n, k, m, sms: [GemvConfig(16, 32, 1, 4, 3), GemvConfig(16, 16, 2, 4, 3, dot=True)]  # noqa: E731
    out = tmp_path / "gemv.json"
    args = _args("--gemv", "--gemv-ms", "1,2", "--result-file", str(out))
    device = torch.get_default_device().type  # cpu (interpreted) here, cuda when the tests run compiled
    payload = bench_kernels.run_gemv(args, copy_GBps=10.0, device=device, timer=_wall_timer, grid=grid,
                                     shapes=shapes)
    rows = payload["measurements"]
    # per shape and M: cuBLAS (torch), two grid configs, and two stage variants of the best one if it is a dot
    dot_best = sum(s["config"].endswith("dot") for s in payload["summary"])
    assert len(rows) == 2 * 2 * (1 + 2) + 2 * dot_best
    assert {r["config"]["num_stages"] for r in rows if r["impl"] == "triton"} <= {2, 3, 4}
    assert all(r.get("ok") for r in rows), [r for r in rows if not r.get("ok")]
    assert {r["impl"] for r in rows} == {"cublas", "triton"}
    assert all(r["us"] > 0 and r["GBps"] > 0 for r in rows)
    assert len(payload["summary"]) == 4 and all(s["triton_us"] for s in payload["summary"])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "kernels-gemv" and len(saved["measurements"]) == len(rows)
    printed = capsys.readouterr().out
    assert "GEMV_TABLE" in printed and "tiny/qkv" in printed


def test_table_entries_and_their_source():
    base = dict(op="linear", N=64, K=128, shape="s")
    cfg = GemvConfig(16, 256, 2, 4, 3, False)
    rows = [dict(base, M=1, impl="cublas", us=10.0), dict(base, M=1, impl="triton", ok=True, us=8.0,
                                                          config=vars(cfg) | {}),
            dict(base, M=2, impl="cublas", us=10.0), dict(base, M=2, impl="triton", ok=True, us=9.9,
                                                          config=vars(cfg) | {}),  # inside the margin
            dict(base, M=4, impl="cublas", us=10.0), dict(base, M=4, impl="triton", ok=False, us=1.0,
                                                          config=vars(cfg) | {})]  # wrong: never chosen
    table = bg.table_entries(rows, margin=0.03)
    assert table == {("linear", 64, 128): {1: cfg}}
    ns = {"GemvConfig": GemvConfig}
    exec(bg.table_source(table), ns)
    assert ns["GEMV_TABLE"] == table


def test_default_grid_and_shapes():
    shapes = {s.name: s for s in bg.default_shapes()}
    assert (shapes["8b/gate_up"].n, shapes["8b/gate_up"].k) == (28672, 4096)
    assert (shapes["8b/down"].n, shapes["8b/down"].k) == (4096, 14336)
    assert (shapes["8b/qkv"].n, shapes["8b/o_proj"].k, shapes["8b/lm_head"].n) == (6144, 4096, 128256)
    assert (shapes["0.5b/qkv"].n, shapes["0.5b/qkv"].bias, shapes["0.5b/down"].k) == (1152, True, 4864)
    tp2 = {s.name: s for s in bg.default_shapes(2)}
    assert (tp2["8b-tp2/qkv"].n, tp2["8b-tp2/down"].k, tp2["0.5b-tp2/qkv"].n) == (3072, 7168, 448 + 128)
    for m in (1, 2, 4, 8):
        grid = bg.gemv_grid(896, 896, m, num_sms=132)
        assert grid and all(isinstance(c, GemvConfig) for c in grid)
        assert any(c.split_k > 1 for c in grid)  # a narrow shape gets split-K candidates
    assert max(c.split_k for c in bg.gemv_grid(28672 * 4, 4096, 1, num_sms=132)) == 2  # full already: 1 and 2
