"""The kernel set a model runs with, and the attention metadata it passes to them.

A model never picks its kernels: the runner hands it a ``KernelOps`` (torch reference on CPU, Triton on
GPU), which keeps model files free of device logic and lets tests swap implementations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from shoal.kernels import cpu_attention, reference


@dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a flattened mixed batch reads and writes the paged KV cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token (-1: padding)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    rotary_and_cache: Callable  # rotate q and k, write k and v to their cache slots, return q
    silu_and_mul: Callable
    paged_attention: Callable
    # (x [..., K], weight [N, K], bias [N] | None) -> [..., N]: a projection's GEMM
    linear: Callable
    # (x, fused gate/up weight [2 * d, K], bias) -> silu(gate) * up, [..., d]
    linear_silu_and_mul: Callable


REFERENCE_OPS = KernelOps(
    name="reference",
    rms_norm=reference.rms_norm,
    rotary_and_cache=reference.rotary_and_cache,
    silu_and_mul=reference.silu_and_mul,
    paged_attention=reference.paged_attention,
    linear=reference.linear,
    linear_silu_and_mul=reference.linear_silu_and_mul,
)


# The reference with a batch's decode tokens attended together (``shoal.kernels.cpu_attention``).
CPU_OPS = dataclasses.replace(REFERENCE_OPS, name="cpu", paged_attention=cpu_attention.paged_attention)


def project(ops: KernelOps, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with a plain ``nn.Linear``'s GEMM run by the kernel set (the skinny decode GEMM where
    it was measured to win, cuBLAS otherwise). Any other layer (a tensor-parallel shard with its own
    communication, a quantized layer) runs its own forward."""
    if type(layer) is nn.Linear:
        return ops.linear(x, layer.weight, layer.bias)
    return layer(x)


def kernel_ops(name: str) -> KernelOps:
    """``"reference"`` (torch, any device), ``"cpu"`` (torch, batched decode attention) or ``"triton"``
    (GPU kernels in ``shoal.kernels``)."""
    if name == "reference":
        return REFERENCE_OPS
    if name == "cpu":
        return CPU_OPS
    if name == "triton":
        from shoal.kernels import activation, gemv, paged_attention, rmsnorm, rotary

        return KernelOps(
            name="triton",
            rms_norm=rmsnorm.rms_norm,
            rotary_and_cache=rotary.rotary_and_cache,
            silu_and_mul=activation.silu_and_mul,
            paged_attention=paged_attention.paged_attention,
            # per shape, statically: gemv where gemv.GEMV_TABLE lists the shape and M, else cuBLAS
            linear=gemv.linear,
            linear_silu_and_mul=gemv.linear_silu_and_mul,
        )
    raise ValueError(f"kernels must be 'reference', 'cpu' or 'triton', got {name!r}")
