"""``EngineConfig``: everything one engine needs to start, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None  # defaults to the model's own
    load_format: str = "auto"  # "auto" | "dummy" (random weights of the model's shape)
    dtype: str = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    kernels: str = "auto"  # "auto": triton on cuda, reference on cpu
    seed: int = 0
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped at 8192 on CPU
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # explicit cache size; overrides the memory-based sizing
    kv_cache_memory_gb: float = 2.0  # CPU: bytes for the KV cache
    gpu_memory_utilization: float = 0.9  # GPU: fraction of total memory the engine may use
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: max(8192, max_model_len) / 2048 on CPU
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (GPU only)
    kv_events: bool = False  # record cached-block changes for subscribers (the router's prefix index)
    tensor_parallel_size: int = 1  # > 1: this many ranks (processes; cuda:0..N-1 on GPU), rank 0 here

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"kernels must be 'auto', 'reference' or 'triton', got {self.kernels!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two in [1, 128], got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        resolve_dtype(self.dtype, torch.device("cpu"))

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def kernel_set(self) -> str:
        if self.kernels == "auto":
            return "triton" if self.torch_device.type == "cuda" else "reference"
        return self.kernels
