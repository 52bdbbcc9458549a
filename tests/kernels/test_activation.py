"""Triton ``silu_and_mul`` against the torch reference."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.activation import silu_and_mul

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("shape", [(1, 128), (7, 200), (3, 5, 2200)])  # d = 1100 spans two column tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    out = silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    atol, rtol = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_strided_rows_and_odd_width():
    x = torch.randn(4, 300)[:, :100]
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 7))
