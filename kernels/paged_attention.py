"""Causal attention of a mixed prefill/decode batch over the paged KV cache (Triton).

Same contract as :func:`reference.paged_attention`: sequence ``s`` owns the query tokens
``query_start_loc[s]:query_start_loc[s + 1]``, the last ones of its ``seq_lens[s]`` context tokens,
whose keys and values are already in the cache; query ``i`` of a sequence sits at position
``seq_len - q_len + i`` and sees every key at or before it. Decode tokens are simply sequences with
one query token; there is no phase flag.

One kernel serves both. A program owns one *query block* (``BLOCK_Q`` consecutive query tokens of one
sequence) and one kv head, and packs the ``GROUP = num_heads // num_kv_heads`` query heads that share
that kv head into the rows of its tile (row ``r`` is token ``r // GROUP``, head ``r % GROUP``): each KV
tile is loaded once per group and both products are ``tl.dot`` s, with fp32 accumulation and an online
(exp2) softmax. Query blocks are numbered without a host sync: sequence ``s``'s blocks start at
``query_start_loc[s] // BLOCK_Q + s``, which leaves at most one idle block per sequence, and each
program finds its sequence by binary search over ``query_start_loc``.

Split-KV (flash-decoding): with ``num_splits > 1`` a third grid axis cuts each query block's keys into
``num_splits`` equal ranges; every program writes its partial ``(max, sum, unnormalised out)`` and a
second kernel combines them. Long contexts with few sequences (decode) then fill the GPU; the
launcher's heuristic (:func:`choose_num_splits`) turns it on only for decode-only batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cast_rne as _cast

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_MIN_SPLIT_KEYS = 128


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, block_id, BLOCK_Q: tl.constexpr):
    """The sequence owning query block ``block_id``: the last ``s`` whose first block is <= it."""
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        right = first_block <= block_id
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, start, kv_hi, table, block_size, k_base, v_base, d, qk_scale,
                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, FP32_DOT: tl.constexpr):
    """One online-softmax step over the keys ``start .. start + BLOCK_N`` (gathered through the
    block table). ``MASKED`` False promises every key is < kv_hi and visible to every row."""
    # acc: [BLOCK_M, HEAD_DIM_PAD] fp32; m_i, l_i: [BLOCK_M] fp32 (log2 units); q: [BLOCK_M, HEAD_DIM_PAD]
    n = start + tl.arange(0, BLOCK_N)  # key positions
    n_ok = n < kv_hi
    d_ok = d < HEAD_DIM
    if MASKED:
        blk = tl.load(table + n // block_size, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(table + n // block_size).to(tl.int64)
    slot = n % block_size
    k_ptrs = k_base + (blk * stride_kb + slot * stride_ks)[None, :] + d[:, None] * stride_kd
    v_ptrs = v_base + (blk * stride_vb + slot * stride_vs)[:, None] + d[None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [HEAD_DIM_PAD, BLOCK_N]
    elif HEAD_DIM == HEAD_DIM_PAD:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = m_new
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
    elif HEAD_DIM == HEAD_DIM_PAD:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    p = p.to(v.dtype)  # as the tensor cores see it, in either mode
    if FP32_DOT:
        pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p, v)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim] (NUM_SPLITS == 1)
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_PAD] fp32 (NUM_SPLITS > 1)
    part_ml_ptr,  # [2, num_tokens, num_heads, NUM_SPLITS] fp32: running max (log2 units), sum
    qk_scale,  # softmax scale * log2(e)
    num_seqs, num_tokens,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    block_size,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FP32_DOT: tl.constexpr,
):
    block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, num_seqs, block_id, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = block_id - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return  # the spare block at the end of this sequence
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # keys cached before this step's first query token

    # Rows: BLOCK_Q tokens x GROUP heads (the tail rows past BLOCK_Q * GROUP are padding).
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + rows // GROUP  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = ctx_len + q_idx  # absolute position: sees keys 0 ..= q_pos
    token = (q_start + q_idx).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, HEAD_DIM_PAD]

    # Keys this block needs: [0, kv_end); a split takes its own BLOCK_N-aligned slice of them.
    kv_end = tl.minimum(seq_len, ctx_len + (q_block + 1) * BLOCK_Q)
    kv_lo = 0
    kv_hi = kv_end
    if NUM_SPLITS > 1:
        split_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = split * split_len
        kv_hi = tl.minimum(kv_end, kv_lo + split_len)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    # Tiles wholly at or before the block's first query position are visible to every row and lie
    # inside kv_hi: they skip both masks. The rest (the diagonal and a ragged end) are masked.
    first_pos = ctx_len + q_block * BLOCK_Q
    unmasked_end = kv_lo + tl.maximum(tl.minimum(kv_hi, first_pos + 1) - kv_lo, 0) // BLOCK_N * BLOCK_N
    for start in range(kv_lo, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_hi, table, block_size, k_base, v_base, d, qk_scale,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False, FP32_DOT)
    for start in range(unmasked_end, kv_hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start, kv_hi, table, block_size, k_base, v_base, d, qk_scale,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True, FP32_DOT)

    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptr, _cast(o, out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (token * (NUM_KV_HEADS * GROUP) + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_ok[:, None])
        ml_stride = num_tokens * (NUM_KV_HEADS * GROUP) * NUM_SPLITS
        tl.store(part_ml_ptr + part, m_i, mask=row_ok)
        tl.store(part_ml_ptr + ml_stride + part, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_seqs"])
def _combine_splits_kernel(
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_PAD] fp32
    part_ml_ptr,  # [2, num_tokens, num_heads, NUM_SPLITS] fp32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_start_loc_ptr,  # [num_seqs + 1]: tokens past its last entry are padding, left alone
    stride_ot, stride_oh, stride_od,
    num_seqs, num_tokens, num_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    # One program per (query token, head): rescale each split's sum and output to the global max.
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if t >= tl.load(query_start_loc_ptr + num_seqs):
        return
    base = (t * num_heads + h) * NUM_SPLITS
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(part_ml_ptr + base + sp)
    l = tl.load(part_ml_ptr + num_tokens * num_heads * NUM_SPLITS + base + sp)
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_ref)  # an empty split (max -inf) weighs 0
    total = tl.sum(w * l, axis=0)
    acc = tl.load(part_out_ptr + (base + sp)[:, None] * HEAD_DIM_PAD + d[None, :])  # [NUM_SPLITS, HEAD_DIM_PAD]
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d * stride_od,
             _cast(o, out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                      num_sms: int) -> int:
    """How many KV splits a batch wants: a power of two, 1 = no split.

    Only decode-only batches split (a prefill block already has plenty of work per program). The
    unsplit grid has one program per sequence and kv head; splits fill it up to ~2 programs per SM,
    as long as each split keeps >= 128 keys (one GPU tile) to amortise the combine. Fitted to a sweep
    of every split count on an H200 (``shoal bench kernels --sweep-splits``, 8 kv heads, head_dim 128):
    the best count lands the grid at 128-256 programs for batch 1-16 and contexts 256-4k (batch 1 at
    4k: 7x faster with 16 splits than unsplit), and batch 64 x 8 kv heads already streams KV unsplit.
    Aiming at 4 programs per SM (the earlier H100 choice) was 12-34 % slower at batch 16.
    """
    programs = num_seqs * num_kv_heads
    if max_query_len != 1 or programs == 0:
        return 1
    want = min((2 * num_sms) // programs, max_seq_len // _MIN_SPLIT_KEYS, _MAX_SPLITS)
    return 1 << (want.bit_length() - 1) if want >= 2 else 1


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths
    scale: float,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], q's dtype
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype
    """Causal attention of a mixed prefill/decode batch over the paged KV cache (GQA aware).

    ``max_query_len`` / ``max_seq_len`` (from the attention metadata) pick the tiles and the split
    count without reading device memory; left out, they are read back (one host sync each).
    ``num_splits``: None = :func:`choose_num_splits`; 1 = never split; n > 1 = split-KV with ``n``
    partitions (rounded up to a power of two; any batch, prefill included). Rows of ``out`` past
    ``query_start_loc[-1]`` are left untouched.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} like q, got {tuple(out.shape)} {out.dtype}")
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if num_splits is None:
        if max_query_len == 1 and max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = choose_num_splits(num_seqs, k_cache.shape[2], max_query_len, max_seq_len or 0,
                                       _num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = min(triton.next_power_of_2(num_splits), _MAX_SPLITS)
    block_m, block_n, num_warps, num_stages = _tiles(num_heads // k_cache.shape[2], head_dim, q.element_size(),
                                                     max_query_len, q.is_cuda)
    _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, block_m=block_m,
            block_n=block_n, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
    return out


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim must be q's head_dim {head_dim}, got {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache / v_cache dtype must be q's dtype {q.dtype}, got {k_cache.dtype} / {v_cache.dtype}")
    num_seqs = seq_lens.shape[0]
    if seq_lens.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got {tuple(query_start_loc.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")


def _tiles(group: int, head_dim: int, elt: int, max_query_len: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): decode needs one token's heads per block and long
    key tiles; prefill wants big query tiles. The GPU choices are the best of a sweep on an H100
    (bf16, head_dim 128, GQA 4); wider rows (``head_dim * elt`` bytes) get shorter key tiles and fewer
    pipeline stages so K and V stay within shared memory. Off the GPU (the interpreter, tests) tiles
    stay small: there they only cost time."""
    min_m = max(16, triton.next_power_of_2(group))
    if not on_gpu:
        return (min_m, 32, 4, 2) if max_query_len == 1 else (max(32, min_m), 32, 4, 2)
    row_bytes = max(16, triton.next_power_of_2(head_dim)) * elt
    if max_query_len == 1:
        return min_m, 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32, 4, 2
    block_n = 64 if row_bytes <= 512 else 32
    return max(128, min_m), block_n, 4, 3 if block_n * row_bytes <= 16384 else 2


def _fp32_dot(q: torch.Tensor) -> bool:
    """Whether both products run as exact fp32 dots (operands upcast, no tf32).

    fp32 inputs: tf32 would cost ~3 decimal digits. bf16 off the GPU: the interpreter's dot multiplies
    bf16's raw bits (it stores them as uint16); upcasting exact bf16 values to fp32 gives the same
    products a tensor core forms, accumulated in fp32 either way.
    """
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type != "cuda")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one program at a time, splitting only adds work


def _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, *,
            block_m: int, block_n: int, num_splits: int, num_warps: int | None = None,
            num_stages: int | None = None) -> None:
    """Run the kernel(s) with explicit tiles (tests use this to cover the GPU tile shapes)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if block_m < group:
        raise ValueError(f"block_m ({block_m}) must be >= the GQA group size ({group})")
    if num_splits & (num_splits - 1) or not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be a power of two in [1, {_MAX_SPLITS}], got {num_splits}")
    num_seqs = seq_lens.shape[0]
    block_q = block_m // group
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    if num_splits > 1:
        part_out = torch.empty((num_tokens, num_heads, num_splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((2, num_tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out  # unused
    if num_warps is None:
        num_warps = 4 if block_m * head_dim_pad <= 64 * 64 else 8
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_ml,
        scale * _LOG2E, num_seqs, num_tokens,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, FP32_DOT=_fp32_dot(q),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            part_out, part_ml, out, query_start_loc, *out.stride(), num_seqs, num_tokens, num_heads,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
        )
