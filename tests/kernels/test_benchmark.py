"""The GPU benchmark module cannot run here (it times with CUDA events); it must at least import
and keep the entry points ``shoal bench kernels`` calls."""

from __future__ import annotations

import inspect

from shoal.kernels import benchmark


def test_entry_points():
    # the names and arguments `shoal bench kernels` (cluster/bench/kernels.py) calls
    for name in ("bench_copy_bandwidth", "bench_matmul_peak", "bench_decode_attention", "bench_prefill_attention",
                 "bench_small_kernels", "bench_sampling", "verify", "run_all", "time_ms"):
        assert callable(getattr(benchmark, name)), name
    shape = {"num_heads", "num_kv_heads", "head_dim", "block_size"}
    assert shape <= set(inspect.signature(benchmark.bench_decode_attention).parameters)
    assert shape <= set(inspect.signature(benchmark.bench_prefill_attention).parameters)
    assert list(inspect.signature(benchmark.bench_decode_attention).parameters)[:2] == ["batches", "contexts"]
    assert inspect.signature(benchmark.run_all).parameters["device"].default == "cuda"
