"""Triton RMSNorm (with and without the fused residual add) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.rmsnorm import rms_norm

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 100), (2, 3, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(shape, dtype, with_residual):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    residual = torch.randn(shape, generator=g).to(dtype) if with_residual else None
    x_before = x.clone()
    ref = reference.rms_norm(x, weight, 1e-6, residual)
    out = rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before)  # inputs are not modified
    atol, rtol = TOL[dtype]
    if with_residual:
        assert torch.equal(out[1], ref[1])  # the residual stream: the same rounded sum, bit for bit
        out, ref = out[0], ref[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_fp32_weight_promotes_like_torch():
    # bf16 activations with an fp32 weight: torch promotes the product (and so must the kernel)
    x = torch.randn(3, 64).bfloat16()
    weight = torch.rand(64) + 0.5
    ref = reference.rms_norm(x, weight, 1e-5)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_strided_rows():
    base = torch.randn(4, 128)
    x = base[:, :64]  # row stride 128
    weight = torch.rand(64)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def test_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.zeros(2, 8), torch.ones(4), 1e-6)
