"""Triton neox rotary embedding against the torch reference."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.rotary import rotary_embedding

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, head_dim]


@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim,dtype",
    [
        (1, 4, 4, 64, torch.float32),
        (7, 9, 3, 64, torch.bfloat16),
        (33, 8, 2, 128, torch.float16),
        (5, 2, 1, 80, torch.float32),
    ],
)
def test_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(num_tokens)
    cache = cos_sin_cache(4096, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    # q and k as views into one fused qkv output (non-contiguous)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    q_ref, k_ref = reference.rotary_embedding(positions, q, k, cache)
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    atol, rtol = TOL[dtype]
    assert q_out.dtype == dtype and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol)


def test_position_zero_is_identity_and_cache_dtype():
    q = torch.randn(2, 2, 32)
    k = torch.randn(2, 1, 32)
    cache = cos_sin_cache(8, 32).bfloat16()  # a bf16 cache is promoted to fp32, as in torch
    q_out, k_out = rotary_embedding(torch.tensor([0, 0]), q, k, cache)
    torch.testing.assert_close(q_out, q)
    q_ref, k_ref = reference.rotary_embedding(torch.tensor([3, 7]), q, k, cache)
    q_out, k_out = rotary_embedding(torch.tensor([3, 7]), q, k, cache)
    torch.testing.assert_close(q_out, q_ref)
    torch.testing.assert_close(k_out, k_ref)


def test_bad_cache():
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                         torch.zeros(4, 8))
