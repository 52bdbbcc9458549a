"""The CPU engine's paged attention (decode tokens batched) against the per-sequence reference, on the
batches the Triton kernel is tested with: shuffled block tables padded with out-of-range ids, and
NaN in every slot no sequence owns, so a read past a sequence's end shows."""

from __future__ import annotations

import pytest
import torch
from tests.kernels.test_paged_attention import BATCHES, TOL, make_batch

from shoal.kernels import cpu_attention, reference


def check(batch, **hints) -> None:
    ref = reference.paged_attention(*batch.args())
    out = cpu_attention.paged_attention(*batch.args(), **hints)
    n = int(batch.query_start_loc[-1])  # rows past the last sequence's tokens are padding: unspecified
    assert out.shape == ref.shape and out.dtype == ref.dtype
    atol, rtol = TOL[batch.q.dtype]
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(BATCHES), ids=list(BATCHES))
def test_batches(shape, dtype):
    q_lens, ctx = BATCHES[shape]
    check(make_batch(q_lens, ctx, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 32), (8, 1, 64, 16)])
def test_decode_batches_of_every_length(num_heads, num_kv_heads, head_dim, block_size):
    # decode only, contexts from one token to several blocks, with and without the engine's hints
    ctx = [0, 5, 15, 16, 17, 63, 200, 1]
    batch = make_batch([1] * len(ctx), ctx, num_heads, num_kv_heads, head_dim, block_size, torch.float32, seed=5)
    check(batch)
    check(batch, max_query_len=1, max_seq_len=int(batch.seq_lens.max()))


def test_a_batch_with_an_empty_sequence_is_not_taken_for_a_decode_batch():
    # three query tokens for three sequences, but one has none and one has two: the mixed path
    check(make_batch([1, 0, 2], [10, 4, 30], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                     dtype=torch.float32, seed=6))


def test_padding_tokens_after_the_batch():
    check(make_batch([1, 1], [7, 40], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                     dtype=torch.float32, seed=7, extra_tokens=3))
