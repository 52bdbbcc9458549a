"""What an ``EngineConfig``'s device options mean to torch: the dtype, the device, the kernel set.

Kept apart from ``workers/config.py`` so the config stays torch-free (routers import it).
"""

from __future__ import annotations

import torch

from .config import EngineConfig

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on CPU (exact reference numerics), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def torch_device(config: EngineConfig) -> torch.device:
    """``device="auto"``: cuda when available, else cpu."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def kernel_set(config: EngineConfig) -> str:
    """``kernels="auto"``: triton on cuda, cpu on cpu."""
    if config.kernels == "auto":
        return "triton" if torch_device(config).type == "cuda" else "cpu"
    return config.kernels


def host_memory_available() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_kv_fits(kv_bytes: int, option: str, available: int | None = None) -> None:
    """Refuse, before allocating, a CPU KV cache larger than the host's free memory: it would swap
    or be OOM-killed mid-serving instead of failing at start. ``option`` names what sized it."""
    available = host_memory_available() if available is None else available
    if available is not None and kv_bytes > available:
        raise ValueError(f"{option}: a CPU KV cache of {kv_bytes / (1 << 30):.2f} GiB does not fit in the "
                         f"{available / (1 << 30):.2f} GiB of free host memory; lower {option}")
