"""Paged attention for the CPU engine: a batch's decode tokens in one set of tensor ops.

The reference (:func:`shoal.kernels.reference.paged_attention`) loops over sequences, gathering,
converting and repeating each one's keys and values before a masked SDPA: at a small model's decode
step that loop is a large share of the step, and it grows with the batch. Here every sequence with
one query token (a decode) is done together: its blocks gathered once into
``[num_decodes, blocks * block_size, num_kv_heads, head_dim]``, the query heads grouped by their kv
head (GQA without repeating keys), scores past each sequence's length masked, softmax, weighted sum,
in fp32. Prefill chunks (more than one query token) take the reference's path, one sequence each.
Same arguments, layouts and results as the reference (to fp32 rounding).
"""

from __future__ import annotations

import torch

from .reference import attend_sequence


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
) -> torch.Tensor:
    num_seqs = seq_lens.shape[0]
    starts = query_start_loc.tolist()
    decodes = [s for s in range(num_seqs) if starts[s + 1] - starts[s] == 1]
    if len(decodes) == num_seqs == q.shape[0]:
        return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)
    out = torch.empty_like(q)
    lens = seq_lens.tolist()
    for s in range(num_seqs):
        if starts[s + 1] - starts[s] > 1:
            out[starts[s]:starts[s + 1]] = attend_sequence(q[starts[s]:starts[s + 1]], k_cache, v_cache,
                                                           block_tables[s], lens[s], scale)
    if decodes:
        rows = torch.tensor([starts[s] for s in decodes])
        index = torch.tensor(decodes)
        out[rows] = decode_attention(q[rows], k_cache, v_cache, block_tables[index], seq_lens[index], scale,
                                     max(lens[s] for s in decodes))
    return out


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: each sequence's one new token
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [num_seqs]
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], q's dtype
    """Each sequence's last token attending to all of its ``seq_len`` cached tokens."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    longest = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    num_blocks = -(-longest // block_size)
    # Columns past a shorter sequence's blocks hold padding: clamped to a real block, read, masked out.
    blocks = block_tables[:, :num_blocks].long().clamp_(0, k_cache.shape[0] - 1)
    span = num_blocks * block_size
    past_end = torch.arange(span, device=q.device) >= seq_lens.to(torch.long).unsqueeze(1)  # [seqs, tokens]
    # [seqs, kv_heads, tokens, head_dim]
    k = k_cache[blocks].view(num_seqs, span, num_kv_heads, head_dim).transpose(1, 2).float()
    v = v_cache[blocks].view(num_seqs, span, num_kv_heads, head_dim).transpose(1, 2).float()
    v = v.masked_fill(past_end[:, None, :, None], 0.0)  # a slot never written may hold NaN: 0 * NaN is NaN
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [seqs, kv_heads, group, tokens]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), v)  # [seqs, kv_heads, group, head_dim]
    return out.view(num_seqs, num_heads, head_dim).to(q.dtype)
