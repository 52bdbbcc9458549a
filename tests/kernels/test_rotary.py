"""Triton neox rotary embedding against the torch reference."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.rotary import rotary_and_cache, rotary_embedding

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


@pytest.mark.parametrize(
    "num_tokens,num_heads,num_kv_heads,head_dim,block_size,dtype",
    [
        (1, 4, 4, 64, 16, torch.float32),
        (7, 9, 3, 64, 4, torch.bfloat16),
        (33, 8, 2, 128, 16, torch.float16),
        (5, 2, 1, 80, 8, torch.float32),
    ],
)
def test_rotary_and_cache_matches_rotary_then_cache_write(num_tokens, num_heads, num_kv_heads, head_dim,
                                                          block_size, dtype):
    g = torch.Generator().manual_seed(100 + num_tokens)
    cache = cos_sin_cache(4096, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)  # strided views, as the model has
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[num_tokens // 2] = -1  # a padding token: its q still rotates, no cache write
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype) for _ in range(4)]
    k_ref, v_ref, k_got, v_got = caches
    q_ref = reference.rotary_and_cache(positions, q, k, v, cache, k_ref, v_ref, slots)
    q_got = rotary_and_cache(positions, q, k, v, cache, k_got, v_got, slots)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(q_got, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_got, k_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_got, v_ref, atol=0, rtol=0)  # a copy
    # The fused kernel equals the two kernels it replaces, bit for bit.
    q2, k2 = rotary_embedding(positions, q, k, cache)
    k_two, v_two = caches[0].clone().fill_(7.0), caches[1].clone().fill_(7.0)
    reference.reshape_and_cache(k2, v, k_two, v_two, slots)
    assert torch.equal(q_got, q2) and torch.equal(k_got, k_two) and torch.equal(v_got, v_two)


def test_rotary_and_cache_refuses_mismatched_shapes():
    q, k = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16)
    kc = torch.zeros(4, 4, 2, 16)
    pos = slots = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="v must be shaped as k"):
        rotary_and_cache(pos, q, k, torch.zeros(2, 1, 16), cos_sin_cache(8, 16), kc, kc, slots)
    with pytest.raises(ValueError, match="k_cache"):
        rotary_and_cache(pos, q, k, k, cos_sin_cache(8, 16), torch.zeros(4, 4, 1, 16), kc, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_and_cache(pos, q, k, k, cos_sin_cache(8, 16), kc, kc, slots[:1])
