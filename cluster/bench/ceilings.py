"""The physical limits a benchmark compares against, measured in the same run on the same GPU."""

from __future__ import annotations

import torch


def _time_cuda(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(num_bytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() * src.element_size() / t


def matmul_peak(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense n x n x n matmul FLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    t = _time_cuda(lambda: a @ b, iters=20)
    return 2 * n**3 / t


def measure() -> dict[str, float]:
    return {"copy_bandwidth_GBps": copy_bandwidth() / 1e9, "bf16_matmul_TFLOPs": matmul_peak() / 1e12}
