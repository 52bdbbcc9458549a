"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even. The interpreter truncates fp32 -> bf16, so bf16 is
    rounded on the bits first (then the cast is exact): interpreter and GPU agree bit for bit."""
    if dtype == tl.bfloat16 and x.dtype != tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)
