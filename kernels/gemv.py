"""Skinny GEMMs for decode: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` for M <= 8 (Triton).

At batch 1..8 a projection is bound by reading W once; cuBLAS reaches that for the widest layers but
not for the thin ones (qkv, o_proj at 63-75 % of the copy bandwidth on an H200). Here each program
owns ``BLOCK_N`` rows of W and streams ``K`` in ``BLOCK_K`` chunks (K contiguous: wide vector loads);
``x`` (a few KB) is re-read from L2 by every program. Accumulation is fp32.

Split-K (``split_k > 1``) cuts K into ``split_k`` ranges, one program each: more programs in flight for
the narrow shapes. Each writes its fp32 partial tile to a workspace ``[split_k, BLOCK_M, N]`` and bumps
a per-column-block counter; the program that finds itself last sums the partials in split order
(0, 1, ..., so the result does not depend on which program finished last: deterministic), adds the
bias, stores y and resets the counter to 0 for the next call. One kernel, no atomics on the data, no
memset: it replays inside a CUDA graph as it is. The counters are kept per (device, stream), so two
streams never share one.

``gate_up_silu`` is the same kernel over a fused gate/up weight ``[2 * d, K]`` (gate rows, then up
rows) with the activation in the epilogue: each program reads gate rows ``n`` and up rows ``d + n``
and writes ``silu(g) * u`` for its slice, so the ``[M, 2 * d]`` intermediate never exists.

The launch configuration is an explicit :class:`GemvConfig`. :data:`GEMV_TABLE` holds the measured
winners by (op, N, K) and M bucket (``shoal bench kernels --gemv`` prints the entries to paste); the
run-time choice between this kernel and cuBLAS (:func:`linear`) is a lookup on shapes alone, so a
CUDA graph captured at each batch size records one fixed kernel. No autotuning at run time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import activation
from .triton_utils import cast_rne as _cast

MAX_M = 8  # the largest token count the kernel serves; bigger batches go to cuBLAS


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = False  # tl.dot on an M padded to 16 (tensor cores), else fp32 FMAs over [BLOCK_M, BLOCK_N, BLOCK_K]

    def __post_init__(self):
        for name in ("block_n", "block_k", "split_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 1, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"GemvConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError("GemvConfig with dot=True needs block_n >= 16 and block_k >= 16")


# (op, N, K) -> {M bucket (1, 2, 4, 8): config}. An entry means "measured: beats cuBLAS at this shape";
# a missing shape or bucket runs cuBLAS. N is the weight's row count (2 * d for "gate_up_silu").
# Fill from `shoal bench kernels --gemv` on the target GPU (it prints these lines).
GEMV_TABLE: dict[tuple[str, int, int], dict[int, GemvConfig]] = {
    ('gate_up_silu', 9728, 896): {
        1: GemvConfig(block_n=16, block_k=256, split_k=1, num_warps=4, num_stages=3, dot=False),
        2: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
        4: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
        8: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
    },
    ('gate_up_silu', 28672, 4096): {
        1: GemvConfig(block_n=32, block_k=128, split_k=1, num_warps=4, num_stages=3, dot=True),
    },
    ('linear', 896, 896): {
        1: GemvConfig(block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=3, dot=False),
        2: GemvConfig(block_n=8, block_k=256, split_k=1, num_warps=4, num_stages=3, dot=False),
        8: GemvConfig(block_n=32, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
    },
    ('linear', 896, 4864): {
        1: GemvConfig(block_n=16, block_k=256, split_k=16, num_warps=4, num_stages=3, dot=False),
        2: GemvConfig(block_n=32, block_k=128, split_k=16, num_warps=4, num_stages=3, dot=True),
        4: GemvConfig(block_n=32, block_k=128, split_k=16, num_warps=4, num_stages=3, dot=True),
        8: GemvConfig(block_n=32, block_k=128, split_k=16, num_warps=4, num_stages=3, dot=True),
    },
    ('linear', 1152, 896): {
        1: GemvConfig(block_n=8, block_k=512, split_k=1, num_warps=4, num_stages=3, dot=False),
        2: GemvConfig(block_n=32, block_k=64, split_k=8, num_warps=4, num_stages=3, dot=True),
        4: GemvConfig(block_n=32, block_k=64, split_k=8, num_warps=4, num_stages=4, dot=True),
        8: GemvConfig(block_n=32, block_k=64, split_k=8, num_warps=4, num_stages=3, dot=True),
    },
    ('linear', 4096, 4096): {
        1: GemvConfig(block_n=16, block_k=512, split_k=1, num_warps=8, num_stages=3, dot=False),
        2: GemvConfig(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=3, dot=True),
        4: GemvConfig(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=3, dot=True),
        8: GemvConfig(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=3, dot=True),
    },
    ('linear', 4096, 14336): {
        1: GemvConfig(block_n=16, block_k=512, split_k=1, num_warps=8, num_stages=3, dot=False),
        8: GemvConfig(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=3, dot=True),
    },
    ('linear', 9728, 896): {
        1: GemvConfig(block_n=16, block_k=256, split_k=1, num_warps=4, num_stages=3, dot=False),
    },
    ('linear', 128256, 4096): {
        1: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=3, dot=True),
        2: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
        4: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
        8: GemvConfig(block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4, dot=True),
    },
}


def m_bucket(m: int) -> int:
    """The padded M a launch compiles for: 1, 2, 4 or 8."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv serves 1..{MAX_M} rows, got {m}")
    return triton.next_power_of_2(m)


def default_config(n: int, k: int, m: int) -> GemvConfig:
    """A reasonable configuration when none was measured: enough column blocks to fill the GPU,
    split-K for the narrow shapes."""
    bm = m_bucket(m)
    block_k = 256 if bm <= 2 else 128
    block_n = 16 if bm <= 4 else 8
    blocks = triton.cdiv(n, block_n)
    split = 1
    while blocks * split < 256 and split < 16 and k // (2 * split) >= 2 * block_k:
        split *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=3)


@triton.jit
def _load_w(w_rows, kk, k_left, n_mask, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    # w_rows: [BLOCK_N, 1] row pointers at this split's first K; kk: [BLOCK_K] offsets from there
    if EVEN_K:
        if EVEN_N:
            return tl.load(w_rows + kk[None, :])
        return tl.load(w_rows + kk[None, :], mask=n_mask, other=0.0)
    return tl.load(w_rows + kk[None, :], mask=n_mask & (kk < k_left)[None, :], other=0.0)


@triton.jit
def _load_chunk(x_rows, w_rows, kk, k_left, m_mask, n_mask, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """One BLOCK_K chunk: x [BLOCK_M, BLOCK_K] (rows past M are zeros) and w [BLOCK_N, BLOCK_K]."""
    if EVEN_K:
        x = tl.load(x_rows + kk[None, :], mask=m_mask, other=0.0)
    else:
        x = tl.load(x_rows + kk[None, :], mask=m_mask & (kk < k_left)[None, :], other=0.0)
    return x, _load_w(w_rows, kk, k_left, n_mask, EVEN_K, EVEN_N)


@triton.jit
def _dot(acc, x, w, FP32_DOT: tl.constexpr):
    # acc: [BLOCK_M >= 16, BLOCK_N] += x [BLOCK_M, BLOCK_K] @ w^T
    if FP32_DOT:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _fma(acc, x, w, BLOCK_M: tl.constexpr):
    # M = 1: acc [BLOCK_N, BLOCK_K] += x [1, BLOCK_K] * w; else acc [BLOCK_M, BLOCK_N, BLOCK_K] += x (x) w
    if BLOCK_M == 1:  # one return: the compiler wants one type for all of a function's returns
        acc = acc + x.to(tl.float32) * w.to(tl.float32)
    else:
        acc = acc + x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K], unit column stride
    w_ptr,  # [N_W, K] (N_W = N, or 2 * N with SILU_MUL), unit column stride
    b_ptr,  # [N_W] or a dummy
    y_ptr,  # [M, N], unit column stride
    part_ptr,  # [SPLIT_K, PARTS, BLOCK_M, N] fp32 workspace (PARTS = 2 with SILU_MUL), unused at SPLIT_K 1
    count_ptr,  # [cdiv(N, BLOCK_N)] int32, zero between calls
    M, N, K, stride_xm, stride_wn, stride_ym,
    chunks_per_split,  # BLOCK_K chunks of K each split reads
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, FP32_DOT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k0 = pid_k * chunks_per_split * BLOCK_K
    # Row bases in int64 (the LM head's N * K passes 2**31 elements at fp32); offsets inside a row int32.
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + k0
    x_rows = x_ptr + offs_m[:, None] * stride_xm + k0
    w_up_rows = w_ptr + (offs_n.to(tl.int64) + N)[:, None] * stride_wn + k0  # SILU_MUL: up rows, N below
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[:, None] < N
    # FMA: the products are summed over K once, after the loop (no cross-thread reduction per chunk).
    # At M = 1 the accumulator is [BLOCK_N, BLOCK_K], in the layout W is loaded in (no shuffle through
    # shared memory); above, [BLOCK_M, BLOCK_N, BLOCK_K].
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if SILU_MUL:
        acc_up = tl.zeros_like(acc)
    if DOT:  # Triton's pipeliner streams the tiles through shared memory (cp.async, num_stages)
        for i in range(0, chunks_per_split):
            kk = i * BLOCK_K + offs_k
            x, w = _load_chunk(x_rows, w_rows, kk, K - k0, m_mask, n_mask, EVEN_K, EVEN_N)
            acc = _dot(acc, x, w, FP32_DOT)
            if SILU_MUL:
                wu = _load_w(w_up_rows, kk, K - k0, n_mask, EVEN_K, EVEN_N)
                acc_up = _dot(acc_up, x, wu, FP32_DOT)
    else:  # no pipeliner for FMA users: the next chunk is loaded (into registers) before this one's FMAs
        x, w = _load_chunk(x_rows, w_rows, offs_k, K - k0, m_mask, n_mask, EVEN_K, EVEN_N)
        if SILU_MUL:
            wu = _load_w(w_up_rows, offs_k, K - k0, n_mask, EVEN_K, EVEN_N)
        for i in range(1, chunks_per_split):
            kk = i * BLOCK_K + offs_k
            x_next, w_next = _load_chunk(x_rows, w_rows, kk, K - k0, m_mask, n_mask, EVEN_K, EVEN_N)
            if SILU_MUL:
                wu_next = _load_w(w_up_rows, kk, K - k0, n_mask, EVEN_K, EVEN_N)
            acc = _fma(acc, x, w, BLOCK_M)
            if SILU_MUL:
                acc_up = _fma(acc_up, x, wu, BLOCK_M)
                wu = wu_next
            x, w = x_next, w_next
        acc = _fma(acc, x, w, BLOCK_M)
        if SILU_MUL:
            acc_up = _fma(acc_up, x, wu, BLOCK_M)
    if DOT:
        out = acc
        if SILU_MUL:
            out_up = acc_up
    elif BLOCK_M == 1:
        out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        if SILU_MUL:
            out_up = tl.sum(acc_up, axis=1)[None, :]
    else:
        out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
        if SILU_MUL:
            out_up = tl.sum(acc_up, axis=2)

    offs_mn = offs_m[:, None] * N + offs_n[None, :]  # into one [BLOCK_M, N] slab of the workspace
    col_mask = offs_n[None, :] < N
    last = True
    if SPLIT_K > 1:
        if SILU_MUL:
            PARTS: tl.constexpr = 2
        else:
            PARTS: tl.constexpr = 1
        slab = BLOCK_M * N
        tl.store(part_ptr + (pid_k * PARTS) * slab + offs_mn, out, mask=col_mask)
        if SILU_MUL:
            tl.store(part_ptr + (pid_k * PARTS + 1) * slab + offs_mn, out_up, mask=col_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        last = done == SPLIT_K - 1
        if last:
            out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if SILU_MUL:
                out_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # fixed order: deterministic
                out += tl.load(part_ptr + (s * PARTS) * slab + offs_mn, mask=col_mask, other=0.0,
                               cache_modifier=".cg")
                if SILU_MUL:
                    out_up += tl.load(part_ptr + (s * PARTS + 1) * slab + offs_mn, mask=col_mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next call
    if last:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if SILU_MUL:
                out_up += tl.load(b_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if SILU_MUL:
            out = out / (1.0 + tl.exp(-out)) * out_up
        y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, _cast(out, y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & col_mask)


class _Counters(threading.local):
    """Split-K counters per (device, stream): zero between calls (the last program resets its own)."""

    def __init__(self):
        self.by_stream: dict[tuple[torch.device, int], torch.Tensor] = {}

    def get(self, device: torch.device, size: int) -> torch.Tensor:
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
        key = (device, stream)
        buf = self.by_stream.get(key)
        if buf is None or buf.numel() < size:
            # Allocated once per stream, and grown rarely: captured in a graph, the zeros are part of it.
            buf = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
            self.by_stream[key] = buf
        return buf

    def clear(self) -> None:
        self.by_stream.clear()


_COUNTERS = _Counters()


def reset_split_counters() -> None:
    """Drop this thread's split-K counters (fresh zeros at the next call): a benchmark does this between
    configs, so one that stopped mid-launch and left a counter non-zero cannot spoil the next."""
    _COUNTERS.clear()


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int, silu_mul: bool,
            config: GemvConfig | None) -> torch.Tensor:
    # x: [M, K]; weight: [n or 2n, K] -> y: [M, n]
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight dtypes differ: {x.dtype} vs {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    cfg = config or default_config(weight.shape[0], k, m)
    bm = max(m_bucket(m), 16) if cfg.dot else m_bucket(m)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else _zero_k(y, bias, n, silu_mul)
    chunks = triton.cdiv(k, cfg.block_k)
    split = min(cfg.split_k, chunks)
    split = 1 << (split.bit_length() - 1)  # a power of two no larger than the chunk count
    per_split = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, per_split)  # no split left without a chunk
    n_blocks = triton.cdiv(n, cfg.block_n)
    if split > 1:
        parts = torch.empty((split, 2 if silu_mul else 1, bm, n), dtype=torch.float32, device=x.device)
        counters = _COUNTERS.get(x.device, n_blocks)
    else:
        parts = counters = y  # never read
    _gemv_kernel[(n_blocks, split)](
        x, weight, bias if bias is not None else y, y, parts, counters,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), per_split,
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        DOT=cfg.dot, FP32_DOT=_fp32_dot(x),
        EVEN_K=k == split * per_split * cfg.block_k, EVEN_N=n % cfg.block_n == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def _fp32_dot(x: torch.Tensor) -> bool:
    """tl.dot on operands upcast to fp32 (exact, no tf32): for fp32 inputs, and for bf16 off the GPU,
    where the interpreter's dot would multiply bf16's raw bits (it stores them as uint16). Exact bf16
    values upcast give the products a tensor core forms, accumulated in fp32 either way."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type != "cuda")


def _zero_k(y: torch.Tensor, bias: torch.Tensor, n: int, silu_mul: bool) -> torch.Tensor:
    b = bias.float()
    out = F.silu(b[:n]) * b[n:] if silu_mul else b
    return y.copy_(out.expand_as(y))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x: [M <= 8, K]``, ``weight: [N, K]``; y in x's dtype, fp32 accumulation."""
    return _launch(x, weight, bias, weight.shape[0], False, config)


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      config: GemvConfig | None = None) -> torch.Tensor:
    """``silu(g) * u`` where ``[g | u] = x @ weight.T + bias``, ``weight: [2 * d, K]`` (gate rows, then up
    rows); y: ``[M, d]``. The projection is not rounded before the activation (one rounding, at the end)."""
    if weight.shape[0] % 2:
        raise ValueError(f"the fused gate/up weight needs an even row count, got {weight.shape[0]}")
    return _launch(x, weight, bias, weight.shape[0] // 2, True, config)


# -- the static choice between this kernel and cuBLAS --------------------------------------------------


def table_config(op: str, x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
    """The measured config when the Triton kernel beats cuBLAS at this shape, else None.

    Shapes only (and device/dtype), never values: the same answer at every call of one shape, so a
    graph captured at a batch size replays the kernel chosen at capture.
    """
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_M or not x.is_cuda:
        return None
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return None
    entry = GEMV_TABLE.get((op, weight.shape[0], weight.shape[1]))
    return None if entry is None else entry.get(m_bucket(x.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the skinny shapes the table lists run by :func:`gemv` (``x: [..., K]``)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    cfg = table_config("linear", x2, weight)
    if cfg is None:
        return F.linear(x, weight, bias)
    return gemv(x2, weight, bias, cfg).view(*x.shape[:-1], weight.shape[0])


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(F.linear(x, weight, bias))`` for a fused gate/up weight, in one kernel where the
    table says so; otherwise cuBLAS then the Triton ``silu_and_mul``."""
    cfg = table_config("gate_up_silu", x, weight)
    if cfg is None:
        return activation.silu_and_mul(F.linear(x, weight, bias))
    return gemv_silu_and_mul(x, weight, bias, cfg)
