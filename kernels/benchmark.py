"""Kernel benchmarks for a GPU: plain functions returning lists of dicts (``shoal bench kernels``
prints and saves them).

Method: each measurement warms up (compiling the kernel), captures ``reps`` calls in one CUDA graph
(so Python launch overhead is not timed), replays it a few times between CUDA events and keeps the
median per call. Launchers get ``max_query_len`` / ``max_seq_len`` so nothing syncs with the host.
The two ceilings come from the same run: :func:`bench_copy_bandwidth` (bytes read + written per
second) bounds the memory-bound kernels, :func:`bench_matmul_peak` the compute-bound prefill.
Inputs that fit in L2 (50 MB on an H100) can beat HBM bandwidth: read the small rows with that in
mind. Rates are in ``GBps`` (1e9 bytes/s) and ``TFLOPs`` (1e12 FLOP/s).

:func:`verify` checks each Triton kernel against ``reference`` on the GPU at benchmark-like sizes
first; a benchmark of a wrong kernel is worthless.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from . import reference
from .activation import silu_and_mul
from .kv_cache_ops import reshape_and_cache
from .paged_attention import _MAX_SPLITS, _num_sms, choose_num_splits, paged_attention
from .rmsnorm import rms_norm
from .rotary import rotary_and_cache, rotary_embedding
from .sampling import sample, support_mask

GB = 1e9


def time_ms(fn: Callable[[], object], *, reps: int = 10, trials: int = 5, graph: bool = True) -> float:
    """Median GPU time of one ``fn()`` call, in milliseconds."""
    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    run = fn
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm the allocator on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run = g.replay
    else:
        def run():
            for _ in range(reps):
                fn()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def bench_copy_bandwidth(num_bytes: int = 1 << 30, device: str = "cuda") -> list[dict]:
    """Device-to-device copy: GB/s counting bytes read + written (the HBM ceiling)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=5)
    return [{"bench": "copy", "bytes": 2 * num_bytes, "ms": ms, "GBps": 2 * num_bytes / (ms * 1e-3) / GB}]


def bench_matmul_peak(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> list[dict]:
    """``n x n @ n x n`` with torch (cuBLAS): TFLOP/s at 2 n^3 FLOPs (the tensor-core ceiling)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), reps=5)
    return [{"bench": "matmul", "n": n, "dtype": str(dtype), "ms": ms, "TFLOPs": 2 * n**3 / (ms * 1e-3) / 1e12}]


def _paged_kv(num_seqs: int, context: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype, device: str):
    """Caches holding num_seqs sequences of ``context`` tokens in shuffled blocks, and their tables."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(num_seqs, blocks_per_seq)
    return k_cache, v_cache, tables


def bench_decode_attention(
    batches=(1, 16, 64, 256),
    contexts=(512, 2048, 8192, 32768),
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    max_kv_bytes: int = 16 * 1024**3,
    sweep_splits: bool = False,
    device: str = "cuda",
) -> list[dict]:
    """One decode step of attention for ``batch`` sequences of ``context`` tokens each (one layer).

    GB/s counts the KV bytes read plus q read and out written. Each shape runs with the launcher's
    split heuristic (``num_splits`` reports its choice) and without splitting, or with every split
    count when ``sweep_splits`` (the data the heuristic is fitted to); shapes whose cache would pass
    ``max_kv_bytes`` are skipped.
    """
    elt = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * num_kv_heads * head_dim * elt
            if kv_bytes > max_kv_bytes:
                continue
            k_cache, v_cache, tables = _paged_kv(batch, context, num_kv_heads, head_dim, block_size, dtype, device)
            q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
            auto = choose_num_splits(batch, num_kv_heads, 1, context, _num_sms(q.device))
            moved = kv_bytes + 2 * q.numel() * elt
            tried = {auto, 1} | ({1 << i for i in range(_MAX_SPLITS.bit_length())} if sweep_splits else set())
            for splits in sorted(tried, reverse=True):
                ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, head_dim**-0.5,
                                                     max_query_len=1, max_seq_len=context, num_splits=splits))
                rows.append({"bench": "decode_attention", "batch": batch, "context": context, "num_splits": splits,
                             "heuristic": splits == auto, "ms": ms, "GBps": moved / (ms * 1e-3) / GB})
            del k_cache, v_cache
    return rows


def bench_prefill_attention(
    lengths=(1024, 2048, 4096, 8192, 16384),
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> list[dict]:
    """Causal attention of one ``length``-token prompt with no cached prefix (one layer).

    TFLOP/s at the causal count ``2 * 2 * heads * head_dim * L^2 / 2`` (QK^T and PV, half the square).
    """
    rows = []
    for length in lengths:
        k_cache, v_cache, tables = _paged_kv(1, length, num_kv_heads, head_dim, block_size, dtype, device)
        q = torch.randn(length, num_heads, head_dim, dtype=dtype, device=device)
        seq_lens = torch.tensor([length], dtype=torch.int32, device=device)
        qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
        ms = time_ms(lambda: paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, head_dim**-0.5,
                                             max_query_len=length, max_seq_len=length), reps=3)
        flops = 2 * 2 * num_heads * head_dim * length**2 / 2
        rows.append({"bench": "prefill_attention", "tokens": length, "ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12})
    return rows


def bench_small_kernels(
    token_counts=(1, 64, 1024, 8192),
    *,
    hidden: int = 4096,
    intermediate: int = 14336,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> list[dict]:
    """RMSNorm (+residual), silu_and_mul, rotary, reshape_and_cache and the fused rotary_and_cache: GB/s
    of bytes read + written."""
    elt = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for n in token_counts:
        x = torch.randn(n, hidden, dtype=dtype, device=device)
        res = torch.randn_like(x)
        w = torch.randn(hidden, dtype=dtype, device=device)
        gate_up = torch.randn(n, 2 * intermediate, dtype=dtype, device=device)
        q = torch.randn(n, num_heads, head_dim, dtype=dtype, device=device)
        k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device)
        pos = torch.randint(0, 8192, (n,), device=device)
        cache = torch.randn(8192, head_dim, dtype=torch.float32, device=device)
        num_blocks = math.ceil(n / block_size) + 1
        k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        v_cache = torch.empty_like(k_cache)
        slots = torch.randperm(num_blocks * block_size, device=device)[:n]
        qk = (q.numel() + k.numel()) * elt
        cases = [
            ("rms_norm+residual", lambda: rms_norm(x, w, 1e-6, res), (4 * x.numel() + hidden) * elt),
            ("silu_and_mul", lambda: silu_and_mul(gate_up), 3 * n * intermediate * elt),
            ("rotary", lambda: rotary_embedding(pos, q, k, cache), 2 * qk + n * head_dim * 4),
            ("reshape_and_cache", lambda: reshape_and_cache(k, k, k_cache, v_cache, slots), 4 * k.numel() * elt),
            # what the model runs: the two above in one launch, k never materialised
            ("rotary_and_cache", lambda: rotary_and_cache(pos, q, k, k, cache, k_cache, v_cache, slots),
             2 * q.numel() * elt + 4 * k.numel() * elt + n * head_dim * 4),
        ]
        for name, fn, moved in cases:
            ms = time_ms(fn)
            rows.append({"bench": name, "tokens": n, "ms": ms, "GBps": moved / (ms * 1e-3) / GB})
    return rows


def bench_sampling(batches=(1, 64, 256), vocab: int = 151936, device: str = "cuda") -> list[dict]:
    """The Triton sampler: greedy, temperature only, and top_k + top_p + min_p (the threshold search)."""
    rows = []
    for batch in batches:
        logits = torch.randn(batch, vocab, device=device) * 4
        seeds = torch.arange(batch, device=device)
        for name, k, p, mp, t in [("greedy", 0, 1.0, 0.0, 0.0), ("temperature", 0, 1.0, 0.0, 0.8),
                                  ("top_k+top_p+min_p", 50, 0.9, 0.05, 0.8)]:
            args = [torch.full((batch,), v, dtype=dt, device=device)
                    for v, dt in ((t, torch.float32), (k, torch.int32), (p, torch.float32), (mp, torch.float32))]
            ms = time_ms(lambda: sample(logits, *args, seeds, 0))
            rows.append({"bench": f"sampling/{name}", "batch": batch, "vocab": vocab, "ms": ms,
                         "GBps_one_pass": logits.numel() * 4 / (ms * 1e-3) / GB})
    return rows


def verify(device: str = "cuda") -> list[dict]:
    """Each kernel against ``reference`` on the device, at sizes the benchmarks use: one row per
    check with its max abs error, tolerance and ``ok``."""
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.bfloat16, 64), (torch.bfloat16, 256),
                            (torch.float16, 128), (torch.float32, 128)):
        rows += _verify_attention(g, dtype, head_dim, device)
    return rows + _verify_small_kernels(g, device) + _verify_sampling(g, device)


def _verify_small_kernels(g: torch.Generator, device: str) -> list[dict]:
    dt, kv_heads, heads, d, bs = torch.bfloat16, 8, 32, 128, 16
    k_cache = torch.randn(64, bs, kv_heads, d, generator=g, device=device).to(dt)
    v_cache = torch.randn(64, bs, kv_heads, d, generator=g, device=device).to(dt)
    key = torch.randn(50, kv_heads, d, generator=g, device=device).to(dt)
    slots = torch.randperm(k_cache.shape[0] * bs, generator=g, device=device)[:50]
    slots[::7] = -1
    kc, vc, kr, vr = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    reshape_and_cache(key, key, kc, vc, slots)
    reference.reshape_and_cache(key, key, kr, vr, slots)
    rows = [_compare("reshape_and_cache", kc, kr, 0.0)]

    x = torch.randn(37, 4096, generator=g, device=device).to(dt)
    r = torch.randn(37, 4096, generator=g, device=device).to(dt)
    w = (1 + 0.1 * torch.randn(4096, generator=g, device=device)).to(dt)
    (got, got_res), (want, want_res) = rms_norm(x, w, 1e-6, r), reference.rms_norm(x, w, 1e-6, r)
    rows += [_compare("rms_norm", got, want, 1e-2, 1.6e-2), _compare("rms_norm/residual", got_res, want_res, 0.0)]
    gu = torch.randn(37, 2 * 5000, generator=g, device=device).to(dt)
    rows.append(_compare("silu_and_mul", silu_and_mul(gu), reference.silu_and_mul(gu), 1e-2, 1.6e-2))

    pos = torch.randint(0, 4096, (37,), generator=g, device=device)
    inv = 1.0 / 500000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(4096, device=device, dtype=torch.float32), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    qq = torch.randn(37, heads, d, generator=g, device=device).to(dt)
    kk = torch.randn(37, kv_heads, d, generator=g, device=device).to(dt)
    (gq, gk), (wq, wk) = rotary_embedding(pos, qq, kk, cache), reference.rotary_embedding(pos, qq, kk, cache)
    rows += [_compare("rotary/q", gq, wq, 1e-2, 1.6e-2), _compare("rotary/k", gk, wk, 1e-2, 1.6e-2)]
    vv = torch.randn(37, kv_heads, d, generator=g, device=device).to(dt)
    s37 = slots[:37]
    kc, vc, kr, vr = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    got = rotary_and_cache(pos, qq, kk, vv, cache, kc, vc, s37)
    want = reference.rotary_and_cache(pos, qq, kk, vv, cache, kr, vr, s37)
    return rows + [_compare("rotary_and_cache/q", got, want, 1e-2, 1.6e-2),
                   _compare("rotary_and_cache/k_cache", kc, kr, 1e-2, 1.6e-2),
                   _compare("rotary_and_cache/v_cache", vc, vr, 0.0)]


def _verify_sampling(g: torch.Generator, device: str) -> list[dict]:
    batch = 64
    logits = torch.randn(batch, 151936, generator=g, device=device) * 4
    full = lambda v, dt: torch.full((batch,), v, dtype=dt, device=device)  # noqa: E731
    temp, top_k, top_p, min_p = full(0.8, torch.float32), full(50, torch.int32), full(0.9, torch.float32), \
        full(0.02, torch.float32)
    seeds = torch.arange(batch, device=device)
    want = reference.sampling_probs(logits.cpu(), temp.cpu(), top_k.cpu(), top_p.cpu(), min_p.cpu()) > 0
    got = support_mask(logits, temp, top_k, top_p, min_p)
    ids = sample(logits, temp, top_k, top_p, min_p, seeds, 0).cpu()
    outside = int((~want[torch.arange(batch), ids]).sum())
    greedy = sample(logits, full(0.0, torch.float32), top_k, top_p, min_p, seeds, 0)
    return [
        _compare("sampling/support_mask", got, want, 0.0),
        {"kernel": "sampling/draws_outside_support", "max_abs_err": float(outside), "atol": 0.0, "ok": outside == 0},
        _compare("sampling/greedy", greedy, logits.argmax(-1), 0.0),
    ]


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> dict:
    got, want = got.float().cpu(), want.float().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    ok = torch.allclose(got, want, atol=atol, rtol=rtol)
    return {"kernel": name, "max_abs_err": err, "atol": atol, "rtol": rtol, "ok": ok}


def _verify_attention(g: torch.Generator, dtype: torch.dtype, head_dim: int, device: str) -> list[dict]:
    """A mixed batch (a chunked prefill on a prefix, a long decode, a short one, a fresh prompt),
    split and unsplit, and its two decode rows alone through the split heuristic."""
    heads, kv_heads, bs = 32, 8, 16
    q_lens, ctx = [300, 1, 1, 77], [1000, 5000, 17, 0]
    seq_lens = [a + b for a, b in zip(q_lens, ctx)]
    blocks = [math.ceil(n / bs) for n in seq_lens]
    k_cache = torch.randn(sum(blocks), bs, kv_heads, head_dim, generator=g, device=device).to(dtype)
    v_cache = torch.randn(sum(blocks), bs, kv_heads, head_dim, generator=g, device=device).to(dtype)
    perm = torch.randperm(sum(blocks), generator=g, device=device).to(torch.int32)
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32, device=device)
    start = 0
    for s, nb in enumerate(blocks):
        tables[s, :nb] = perm[start : start + nb]
        start += nb
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g, device=device).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}[dtype]
    name = f"paged_attention/{str(dtype).split('.')[-1]}/d{head_dim}"
    cpu = lambda *ts: [t.cpu() for t in ts]  # noqa: E731  (the reference builds its masks on the CPU)
    want = reference.paged_attention(*cpu(q, k_cache, v_cache, tables, sl, qsl), scale)
    rows = []
    for splits in (1, 4):
        got = paged_attention(q, k_cache, v_cache, tables, sl, qsl, scale, num_splits=splits)
        rows.append(_compare(f"{name}/mixed/splits={splits}", got, want, *tol))
    dec = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    dq = q[300:302]
    want = reference.paged_attention(*cpu(dq, k_cache, v_cache, tables[1:3], sl[1:3], dec), scale)
    got = paged_attention(dq, k_cache, v_cache, tables[1:3], sl[1:3], dec, scale, max_query_len=1, max_seq_len=5001)
    rows.append(_compare(f"{name}/decode/heuristic", got, want, *tol))
    return rows


def run_all(device: str = "cuda") -> dict[str, list[dict]]:
    """Everything above with its defaults, correctness and ceilings first."""
    return {
        "verify": verify(device),
        "copy": bench_copy_bandwidth(device=device),
        "matmul": bench_matmul_peak(device=device),
        "decode_attention": bench_decode_attention(device=device),
        "prefill_attention": bench_prefill_attention(device=device),
        "small_kernels": bench_small_kernels(device=device),
        "sampling": bench_sampling(device=device),
    }
