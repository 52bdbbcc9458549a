"""Triton ``reshape_and_cache`` against the torch reference: slots, padding, strides, dtype casts."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels.kv_cache_ops import reshape_and_cache


@pytest.mark.parametrize(
    "num_tokens,num_kv_heads,head_dim,block_size,dtype",
    [
        (1, 1, 64, 16, torch.float32),
        (7, 2, 128, 32, torch.float16),
        (33, 3, 64, 16, torch.bfloat16),
        (33, 8, 80, 32, torch.float32),  # head_dim no power of two
    ],
)
def test_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, dtype):
    g = torch.Generator().manual_seed(num_tokens)
    num_blocks = 6
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    # distinct slots in shuffled order, every third token padding (-1)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::3] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_strided_inputs_and_cast():
    # key / value as views into a fused qkv output; fp32 activations into a bf16 cache
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(5, 4 + 2 + 2, 32, generator=g)
    key, value = qkv[:, 4:6], qkv[:, 6:8]
    assert not key.is_contiguous()
    slots = torch.tensor([17, 0, -5, 31, 16], dtype=torch.int64)
    k_cache = torch.zeros(2, 16, 2, 32, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert k_cache.flatten(0, 1)[[1, 2, 3]].abs().sum() == 0  # untouched slots stay zero


def test_all_padding_writes_nothing():
    key = torch.ones(3, 1, 16)
    k_cache = torch.zeros(1, 16, 1, 16)
    v_cache = torch.zeros(1, 16, 1, 16)
    reshape_and_cache(key, key, k_cache, v_cache, torch.full((3,), -1))
    assert k_cache.abs().sum() == 0 and v_cache.abs().sum() == 0


def test_bad_shapes():
    key = torch.zeros(3, 2, 16)
    cache = torch.zeros(1, 16, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        reshape_and_cache(key, key, cache, cache, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="heads/head_dim"):
        reshape_and_cache(key, key, torch.zeros(1, 16, 1, 16), torch.zeros(1, 16, 1, 16), torch.zeros(3))
