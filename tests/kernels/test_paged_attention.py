"""Triton paged attention against the torch reference: mixed prefill/decode batches, GQA, split-KV.

Every batch is built so that a wrong read shows: block tables are shuffled and padded with
out-of-range ids, and every cache slot that holds no token of a sequence is NaN, so touching a
block past a sequence's end, a slot past its length, or a key past the causal edge poisons the
output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from shoal.kernels import reference
from shoal.kernels import paged_attention as pa

TOL = {  # dtype -> (atol, rtol); fp16/bf16 round P to the input dtype before P @ V, as flash attention does
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.5e-2, 1.5e-2),
}


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    scale: float

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc, self.scale)


def make_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0,
               extra_tokens=0) -> Batch:
    """Sequence s has ctx_lens[s] cached tokens and q_lens[s] new ones (already in the cache)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + 2
    tables = torch.full((len(seq_lens), width), 10**6, dtype=torch.int32)  # padding: far out of range
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for s, n in enumerate(seq_lens):
        blocks = [perm.pop() for _ in range(need[s])]
        tables[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for t in range(n):
            b, o = blocks[t // block_size], t % block_size
            k_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
    num_tokens = sum(q_lens) + extra_tokens
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), qsl, head_dim**-0.5)


def check(batch: Batch, **kwargs) -> torch.Tensor:
    ref = reference.paged_attention(*batch.args())
    out = pa.paged_attention(*batch.args(), **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    atol, rtol = TOL[batch.q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    return out


# (query lengths, cached-prefix lengths): prefill from scratch, chunked prefill on a prefix, decode,
# a sequence with no tokens this step, and mixes of all of them.
BATCHES = {
    "one-token": ([1], [0]),
    "prefill-7": ([7], [0]),
    "chunk-33-on-prefix": ([33], [20]),
    "decode-3": ([1, 1, 1], [15, 64, 33]),
    "mixed": ([5, 1, 12, 1], [3, 40, 17, 0]),
    "empty-seq": ([3, 0, 2], [4, 10, 31]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", list(BATCHES), ids=list(BATCHES))
def test_batches(shape, dtype):
    q_lens, ctx = BATCHES[shape]
    check(make_batch(q_lens, ctx, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype))


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size,dtype",
    [
        (4, 4, 64, 32, torch.float32),  # MHA
        (8, 2, 128, 16, torch.bfloat16),  # GQA 4
        (8, 1, 64, 32, torch.float16),  # GQA 8 (MQA)
        (6, 2, 64, 16, torch.float32),  # GQA 3 (SmolLM2's 9/3): a group that is no power of two
        (9, 3, 128, 32, torch.float32),
        (4, 2, 16, 16, torch.float32),  # the smallest head_dim tl.dot takes
        (2, 1, 80, 16, torch.float16),  # head_dim no power of two: padded and masked
    ],
)
def test_heads_dims_blocks(num_heads, num_kv_heads, head_dim, block_size, dtype):
    check(make_batch([6, 1, 17], [9, 37, 0], num_heads, num_kv_heads, head_dim, block_size, dtype, seed=1))


@pytest.mark.parametrize("num_splits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode(num_splits, dtype):
    # contexts from a few tokens (most splits empty) to several hundred
    batch = make_batch([1, 1, 1], [300, 5, 130], num_heads=8, num_kv_heads=2, head_dim=64,
                       block_size=16, dtype=dtype, seed=2)
    split = check(batch, num_splits=num_splits, max_query_len=1)
    whole = pa.paged_attention(*batch.args(), num_splits=1, max_query_len=1)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(split.float(), whole.float(), atol=atol, rtol=rtol)


def test_split_kv_mixed_batch():
    # the split path is general: prefill blocks split their causal key range too
    check(make_batch([9, 1, 4], [40, 70, 0], num_heads=4, num_kv_heads=1, head_dim=64, block_size=32,
                     dtype=torch.float32, seed=3), num_splits=4)


@pytest.mark.parametrize("block_m,block_n,num_splits", [(128, 64, 1), (128, 64, 2), (16, 128, 1), (16, 16, 4)])
def test_gpu_tiles(block_m, block_n, num_splits):
    # the tile shapes the launcher picks on a GPU, run here through the same entry point it uses
    batch = make_batch([20, 1, 3], [50, 9, 0], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, seed=4)
    ref = reference.paged_attention(*batch.args())
    out = torch.empty_like(batch.q)
    pa._launch(*batch.args(), out, block_m=block_m, block_n=block_n, num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_out_and_padding_tokens(num_splits):
    # rows past query_start_loc[-1] (CUDA-graph padding) are left as they were
    batch = make_batch([1, 1], [10, 3], num_heads=2, num_kv_heads=1, head_dim=32, block_size=16,
                       dtype=torch.float32, seed=5, extra_tokens=3)
    out = torch.full_like(batch.q, 7.0)
    got = pa.paged_attention(*batch.args(), out=out, num_splits=num_splits, max_query_len=1, max_seq_len=11)
    assert got is out
    assert torch.all(out[2:] == 7.0)
    ref = reference.paged_attention(*batch.args())
    torch.testing.assert_close(out[:2], ref[:2], atol=2e-5, rtol=2e-5)


def test_strided_q():
    # q as a view into a fused qkv projection output
    batch = make_batch([4, 1], [3, 20], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                       dtype=torch.float32, seed=6)
    qkv = torch.randn(batch.q.shape[0], 8, 32)
    qkv[:, :4] = batch.q
    batch.q = qkv[:, :4]
    assert not batch.q.is_contiguous()
    check(batch)


def test_choose_num_splits():
    assert pa.choose_num_splits(1, 8, max_query_len=1, max_seq_len=32768, num_sms=132) == 32
    assert pa.choose_num_splits(1, 8, max_query_len=1, max_seq_len=4096, num_sms=132) == 32
    assert pa.choose_num_splits(4, 8, max_query_len=1, max_seq_len=2048, num_sms=132) == 8
    assert pa.choose_num_splits(16, 8, max_query_len=1, max_seq_len=32768, num_sms=132) == 2
    assert pa.choose_num_splits(1, 8, max_query_len=1, max_seq_len=200, num_sms=132) == 1  # short
    assert pa.choose_num_splits(64, 8, max_query_len=1, max_seq_len=32768, num_sms=132) == 1  # GPU full
    assert pa.choose_num_splits(1, 8, max_query_len=7, max_seq_len=32768, num_sms=132) == 1  # prefill
    for n in range(1, 40):
        s = pa.choose_num_splits(n, 2, 1, 10**6, 132)
        assert s & (s - 1) == 0 and 1 <= s <= 64


def test_bad_inputs():
    batch = make_batch([2], [0], num_heads=3, num_kv_heads=3, head_dim=16, block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        pa.paged_attention(batch.q[:, :2], *batch.args()[1:])
    with pytest.raises(ValueError, match="dtype"):
        pa.paged_attention(batch.q.half(), *batch.args()[1:])
    with pytest.raises(ValueError, match="query_start_loc"):
        pa.paged_attention(*batch.args()[:5], batch.query_start_loc[:1], batch.scale)
    with pytest.raises(ValueError, match="num_splits"):
        pa.paged_attention(*batch.args(), num_splits=0)
