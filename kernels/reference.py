"""Torch reference implementations: the oracle every Triton kernel is tested against, and the
attention path the CPU engine runs.

Conventions shared with the Triton kernels (same argument names, same layouts):

- paged KV cache, one pair per layer: ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``;
  token ``t`` of a sequence lives in block ``block_tables[seq, t // block_size]`` at offset
  ``t % block_size``; a *slot* is ``block_id * block_size + offset``.
- a batch mixes prefill chunks and decode tokens with no phase flag: sequence ``s`` contributes the
  query tokens ``query_start_loc[s]:query_start_loc[s + 1]``, the last ones of its ``seq_lens[s]``
  context tokens (cached prefix + new tokens). A query token attends causally to its own position
  and every earlier one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int; a negative slot means "do not write" (padding)
) -> None:
    """Write each token's key and value into its slot of the paged cache."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: ``[seq_len, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths
    scale: float,
    *,
    max_query_len: int | None = None,  # hints for kernels that size launches by them; unused here
    max_seq_len: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype
    """Causal attention of a mixed prefill/decode batch over the paged KV cache (GQA aware).

    Computed in fp32. The new tokens' keys and values must already be in the cache
    (``reshape_and_cache`` first), so a prefill chunk sees its cached prefix and itself alike.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[s], starts[s + 1]
        if q_end > q_start:
            out[q_start:q_end] = attend_sequence(q[q_start:q_end], k_cache, v_cache, block_tables[s], seq_len, scale)
    return out


def attend_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_len: int, scale: float) -> torch.Tensor:
    """One sequence's query tokens (``[q_len, num_heads, head_dim]``, the last ``q_len`` of its
    ``seq_len``) attending causally to its cached context, in fp32; -> q's shape and dtype."""
    q_len = q.shape[0]
    group = q.shape[1] // k_cache.shape[2]
    k = gather_kv(k_cache, block_table, seq_len).float()
    v = gather_kv(v_cache, block_table, seq_len).float()
    # [heads, tokens, head_dim]; kv heads repeated for GQA
    qs = q.float().transpose(0, 1)
    k = k.transpose(0, 1).repeat_interleave(group, dim=0)
    v = v.transpose(0, 1).repeat_interleave(group, dim=0)
    # query i sits at position seq_len - q_len + i and sees keys 0 ..= that position
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
    mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, seq_len]
    o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with ``residual``, first ``x = x + residual`` and return ``(normed, x)``.

    Matches HF Llama: normalise in fp32, cast back to the input dtype, then scale by the weight.
    """
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, residual)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (the halves of each head rotate together), as HF Llama does."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()]
    cos = cos_sin[:, :half].unsqueeze(1)
    sin = cos_sin[:, half:].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


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
    """Rotate q and k, write the rotated k and v to their cache slots; return the rotated q."""
    q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)
    return q


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x: [..., 2 * d]`` (the gated MLP's activation)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def sampling_probs(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B] float; 0 = greedy
    top_k: torch.Tensor,  # [B] int; <= 0 or >= V = off
    top_p: torch.Tensor,  # [B] float in (0, 1]; 1 = off
    min_p: torch.Tensor,  # [B] float in [0, 1]; 0 = off
) -> torch.Tensor:  # [B, V] float32, each row sums to 1
    """The distribution a row is sampled from: temperature, then min_p, top_k, top_p, renormalised.

    Greedy rows (temperature 0) are one-hot on the first maximum. Every filter keeps an upper set of
    the logits and a token tied with the last one kept is kept too (cuts are thresholds on the
    value): min_p keeps ``prob >= min_p * max prob``; top_k keeps logits >= the k-th largest of what
    min_p left; top_p keeps the smallest most-likely-first prefix of what is left whose renormalised
    mass reaches ``top_p`` (so the most likely token always stays).
    """
    x = logits.float()
    batch, vocab = x.shape
    out = torch.zeros_like(x)
    for i in range(batch):
        t = float(temperature[i])
        if t <= 0:
            out[i, int(x[i].argmax())] = 1.0
            continue
        s = x[i] / t
        p = torch.softmax(s, dim=-1)
        keep = torch.ones(vocab, dtype=torch.bool)
        if float(min_p[i]) > 0:
            keep &= p >= float(min_p[i]) * p.max()
        k = int(top_k[i])
        if 0 < k < vocab and int(keep.sum()) > k:
            kth = torch.where(keep, s, float("-inf")).topk(k).values[-1]
            keep &= s >= kth
        if float(top_p[i]) < 1:
            kept = torch.where(keep, p, 0.0)
            kept = kept / kept.sum()
            sorted_p, order = kept.sort(descending=True)
            mass_before = sorted_p.cumsum(0) - sorted_p
            last = int((mass_before < float(top_p[i])).sum()) - 1  # index of the last token kept
            keep &= s >= s[order[max(last, 0)]]
        probs = torch.where(keep, p, 0.0)
        out[i] = probs / probs.sum()
    return out


def sample_reference(
    logits: torch.Tensor,  # [B, V]
    temperature: torch.Tensor,  # [B]
    top_k: torch.Tensor,  # [B]
    top_p: torch.Tensor,  # [B]
    min_p: torch.Tensor,  # [B]
    seeds: torch.Tensor,  # [B] int64
    step: int | torch.Tensor,  # one int, or [B] per row
) -> torch.Tensor:  # [B] int64
    """One token per row from :func:`sampling_probs`, drawn with a CPU generator seeded by (seed, step).

    Same distribution as the Triton sampler and the same independence from the rest of the batch,
    but not the same random numbers: compare the two statistically, never draw by draw.
    """
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    steps = step.tolist() if isinstance(step, torch.Tensor) else [int(step)] * probs.shape[0]
    ids = []
    for i, (seed, st) in enumerate(zip(seeds.tolist(), steps)):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + st) % (2**63))
        ids.append(int(torch.multinomial(probs[i], 1, generator=gen)))
    return torch.tensor(ids, dtype=torch.int64)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``x: [..., K]``, ``weight: [N, K]``): what ``gemv`` computes, via torch."""
    return F.linear(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The skinny GEMM's oracle: accumulated in fp32, rounded once to x's dtype (as the kernel does)."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(g) * u`` of ``[g | u] = x @ weight.T + bias`` (gate rows, then up rows), all in fp32, one
    rounding at the end (the fused kernel never rounds the projection)."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    d = weight.shape[0] // 2
    return (F.silu(out[:, :d]) * out[:, d:]).to(x.dtype)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The gated MLP's first half with a fused gate/up weight: the model's reference path."""
    return silu_and_mul(F.linear(x, weight, bias))
