"""RMSNorm with an optional fused residual add (Triton).

Same numerics as :func:`reference.rms_norm` (HF Llama): with a residual, ``x + residual`` is rounded
to its dtype first (that sum is also the new residual stream); the mean square is taken in fp32; the
normalised value is cast back to the input dtype *before* the weight multiplies it; the result has
torch's promoted dtype of ``weight`` and ``x``. Inputs are never modified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cast_rne as _cast


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr,  # x, res: [rows, hidden] (row stride given); w: [hidden]
    out_ptr, res_out_ptr,  # [rows, hidden], contiguous
    stride_x, stride_res,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the residual stream's dtype: that is what the next layer sees.
        x = _cast(x.to(tl.float32) + r.to(tl.float32), res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * hidden + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = _cast(xf * inv_rms, x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, _cast(out, out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden] (any leading dims)
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with ``residual``, first ``x = x + residual`` and return ``(normed, x)``."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [hidden={hidden}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    sum_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=sum_dtype, device=x.device) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, res2, weight.contiguous(), out, res_out,
            x2.stride(0), res2.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            num_warps=_num_warps(hidden),
        )
    return out if residual is None else (out, res_out)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, hidden] with unit column stride (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(hidden: int) -> int:
    return 1 if hidden <= 512 else 4 if hidden <= 4096 else 8
