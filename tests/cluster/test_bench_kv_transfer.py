"""``shoal bench kv-transfer`` on cpu,cpu (gloo): a tiny KV shape end to end through the CLI, the
defaults it resolves, its refusals, and a child's failure reaching the parent's error."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from shoal.cluster.bench.kv_transfer import KVBenchConfig, config_from_args, run
from shoal.cluster.cli import build_parser, main

TINY = ["--devices", "cpu,cpu", "--layers", "3", "--kv-heads", "2", "--head-dim", "16", "--block-size", "16",
        "--iters", "2", "--warmup", "1", "--layers-per-chunk", "2", "--timeout", "30"]


def test_a_tiny_run_moves_the_right_blocks_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "kv.json"
    # 40 tokens: 3 blocks, the last one partly filled (a prompt's blocks, rounded up)
    assert main(["bench", "kv-transfer", *TINY, "--tokens", "16,40", "--result-file", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "kv-transfer" and data["backend"] == "gloo"
    assert data["devices"] == ["cpu", "cpu"] and data["env"]["torch"]
    assert data["config"]["num_layers"] == 3 and data["bytes_per_token"] == 2 * 3 * 2 * 16 * 4
    rows = data["results"]
    assert [r["tokens"] for r in rows] == [16, 40] and [r["blocks"] for r in rows] == [1, 3]
    for r in rows:
        assert r["verified"] is True
        assert r["MB"] == pytest.approx(r["blocks"] * 16 * data["bytes_per_token"] / 1e6)
        for key in ("ceiling_GBps", "path_GBps", "pipelined_GBps", "gather_ms", "scatter_ms"):
            assert r[key] > 0, key
        assert r["path_pct"] == pytest.approx(100 * r["path_GBps"] / r["ceiling_GBps"])
    printed = capsys.readouterr().out
    assert "pipelined_GBps" in printed and "target >= 150 GB/s" in printed
    assert multiprocessing.active_children() == []


def test_defaults_take_the_model_shape_from_the_preset():
    args = build_parser().parse_args(["bench", "kv-transfer", "--devices", "cpu,cpu"])
    cfg = config_from_args(args)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == (32, 8, 128)  # Llama-3.1-8B
    assert cfg.dtype == "float32" and cfg.tokens == (1024, 2048, 4096, 8192, 16384, 32768)
    assert cfg.cache_blocks == 2 * 32768 // 16 and cfg.layers_per_chunk == 4
    args = build_parser().parse_args(["bench", "kv-transfer", "--devices", "cpu,cpu", "--model-shape",
                                      "qwen2.5-0.5b", "--head-dim", "32", "--no-pipeline"])
    cfg = config_from_args(args)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.layers_per_chunk) == (24, 2, 32, None)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        config_from_args(build_parser().parse_args(["bench", "kv-transfer", "--devices", "cpu,cpu", "--layers", "0"]))


@pytest.mark.parametrize("changes, message", [
    (dict(devices=("cpu", "cuda:0")), "devices must be both cpu or both cuda"),
    (dict(devices=("cpu",)), "devices must name two devices"),
    (dict(warmup=0), "warmup must be >= 1"),
    (dict(tokens=()), "tokens must be one or more"),
    (dict(tokens=(64,), cache_blocks=3), "cache_blocks must hold the largest prompt's 4 blocks"),
    (dict(layers_per_chunk=0), "layers_per_chunk must be >= 1"),
    (dict(dtype="int8"), "dtype must be one of"),
])
def test_bad_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        KVBenchConfig(**changes)


def test_too_much_host_memory_is_refused_before_spawning(capsys):
    assert main(["bench", "kv-transfer", "--devices", "cpu,cpu", "--tokens", "100000000"]) == 2
    assert "of host memory" in capsys.readouterr().err
    assert multiprocessing.active_children() == []


def test_a_failure_inside_a_child_reaches_the_parent_with_its_traceback():
    cfg = KVBenchConfig(devices=("cpu", "cpu"), num_layers=2, num_kv_heads=1, head_dim=8, tokens=(16,),
                        iters=1, warmup=1, timeout_s=30)
    # A value validation refuses, planted past it: both ends now fail in send_blocks/recv_blocks,
    # after the ceiling and the plain path went through.
    object.__setattr__(cfg, "layers_per_chunk", 0)
    with pytest.raises(ValueError, match=r"(?s)kv-transfer shoal-kv-bench-\w+ \(rank \d\) failed:.*"
                                         r"Traceback.*layers_per_chunk must be >= 1"):
        run(cfg)
    assert multiprocessing.active_children() == []
