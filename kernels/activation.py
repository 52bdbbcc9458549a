"""The gated MLP activation ``silu(gate) * up`` (Triton).

Same numerics as :func:`reference.silu_and_mul` in torch: ``silu`` is computed in fp32 and rounded to
the input dtype, then multiplied by ``up`` and rounded again (two roundings, as two torch ops do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cast_rne as _cast


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [rows, 2 * d], row stride given, unit column stride
    out_ptr,  # [rows, d], contiguous
    stride_x, d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = _cast(g / (1.0 + tl.exp(-g)), gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * d + cols, _cast(out, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x: [..., 2 * d]`` (the gated MLP's activation)."""
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows and d:
        block = min(triton.next_power_of_2(d), 1024)
        _silu_and_mul_kernel[(rows, triton.cdiv(d, block))](x2, out, x2.stride(0), d, BLOCK=block)
    return out
