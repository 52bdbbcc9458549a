"""Neox-style rotary position embedding for q and k (Triton).

Same contract as :func:`reference.rotary_embedding`: ``cos_sin_cache[pos]`` holds ``cos`` in its
first half and ``sin`` in its second; the two halves of every head rotate together; the rotation is
computed in fp32 and rounded to the input dtype. Any frequency scaling (llama3, yarn, ...) is already
baked into the cache by the model, so the kernel only reads it. Returns new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cast_rne as _cast


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_t, stride_h, stride_d, t, cos, sin, num_heads,
                  HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    # src: [num_tokens, num_heads, 2 * HALF] strided; dst: the same shape, contiguous
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (d < HALF)
    src = src_ptr + t * stride_t + h * stride_h + d * stride_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + t * num_heads * 2 * HALF + h * 2 * HALF + d
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, _cast(x1 * cos - x2 * sin, ty), mask=mask)
    tl.store(dst + HALF, _cast(x2 * cos + x1 * sin, ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,  # [num_tokens]
    q_ptr, k_ptr,  # [num_tokens, heads, head_dim] strided
    q_out_ptr, k_out_ptr,  # contiguous
    cache_ptr,  # [max_position, head_dim]
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_cache,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qd, t, cos, sin, num_heads,
                  HALF, Q_HEADS_PAD, HALF_PAD)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kd, t, cos, sin, num_kv_heads,
                  HALF, K_HEADS_PAD, HALF_PAD)


def _check_rotary_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """The shapes both entry points share: q [T, H, D], k [T, Hkv, D], positions [T], cache [P, D], D even."""
    num_tokens, _, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(
            f"k must be [num_tokens={num_tokens}, num_kv_heads, head_dim={head_dim}], got {tuple(k.shape)}"
        )
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [num_tokens={num_tokens}], got {tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or head_dim % 2:
        raise ValueError(
            f"cos_sin_cache must be [max_position, head_dim={head_dim}] with an even head_dim, "
            f"got {tuple(cos_sin_cache.shape)}"
        )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (the halves of each head rotate together), as HF Llama does."""
    num_tokens, num_heads, head_dim = q.shape
    _check_rotary_args(positions, q, k, cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, q_out, k_out, cache,
        *q.stride(), *k.stride(), cache.stride(0),
        num_heads, k.shape[1],
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads), K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
    )
    return q_out, k_out


@triton.jit
def _rotary_and_cache_kernel(
    pos_ptr, slot_ptr,  # [num_tokens]
    q_ptr, k_ptr, v_ptr,  # [num_tokens, heads, head_dim] strided (views into a fused qkv output)
    q_out_ptr,  # contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    cache_ptr,  # [max_position, head_dim]
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_kc_d,
    stride_vc_b, stride_vc_s, stride_vc_h, stride_vc_d,
    stride_cache, block_size,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
):
    # One program per token: its q heads rotate into q_out; its k heads rotate straight into the cache
    # slot and its v heads are copied beside them (a padding token, slot < 0, writes no cache).
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qd, t, cos, sin, num_heads,
                  HALF, Q_HEADS_PAD, HALF_PAD)
    h = tl.arange(0, K_HEADS_PAD)[:, None]
    mask = (h < num_kv_heads) & (d < HALF) & (h * 0 + slot >= 0)  # a tensor: the interpreter refuses a scalar term
    blk = tl.maximum(slot, 0) // block_size
    off = tl.maximum(slot, 0) % block_size
    k_src = k_ptr + t * stride_kt + h * stride_kh + d * stride_kd
    k1 = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF * stride_kd, mask=mask, other=0.0).to(tl.float32)
    k_ty = k_ptr.dtype.element_ty  # rounded as the unfused rotary rounds k, then cast for the cache
    k_dst = k_cache_ptr + blk * stride_kc_b + off * stride_kc_s + h * stride_kc_h + d * stride_kc_d
    kc_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_dst, _cast(_cast(k1 * cos - k2 * sin, k_ty).to(tl.float32), kc_ty), mask=mask)
    tl.store(k_dst + HALF * stride_kc_d, _cast(_cast(k2 * cos + k1 * sin, k_ty).to(tl.float32), kc_ty),
             mask=mask)
    v_src = v_ptr + t * stride_vt + h * stride_vh + d * stride_vd
    v_dst = v_cache_ptr + blk * stride_vc_b + off * stride_vc_s + h * stride_vc_h + d * stride_vc_d
    vc_ty = v_cache_ptr.dtype.element_ty
    tl.store(v_dst, _cast(tl.load(v_src, mask=mask), vc_ty), mask=mask)
    tl.store(v_dst + HALF * stride_vc_d, _cast(tl.load(v_src + HALF * stride_vd, mask=mask), vc_ty), mask=mask)


def rotary_and_cache(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int; negative = padding, writes nothing
) -> torch.Tensor:
    """:func:`rotary_embedding` then ``reshape_and_cache`` in one launch (the rotated k goes straight to
    its cache slot and is never materialised); returns the rotated q. Same results as the two kernels."""
    num_tokens, num_heads, head_dim = q.shape
    _check_rotary_args(positions, q, k, cos_sin_cache)
    num_kv_heads = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"v must be shaped as k {tuple(k.shape)}, got {tuple(v.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [num_tokens={num_tokens}], got {tuple(slot_mapping.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    half = head_dim // 2
    _rotary_and_cache_kernel[(num_tokens,)](
        positions, slot_mapping, q, k, v, q_out, k_cache, v_cache, cache,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        cache.stride(0), k_cache.shape[1],
        num_heads, num_kv_heads,
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        Q_HEADS_PAD=triton.next_power_of_2(num_heads), K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
    )
    return q_out
