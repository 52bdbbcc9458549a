"""The skinny-GEMM benchmark behind ``shoal bench kernels --gemv``: cuBLAS (``F.linear``) against a small
grid of :class:`~shoal.kernels.gemv.GemvConfig` at decode shapes, M in 1..8; the winners become
:data:`~shoal.kernels.gemv.GEMV_TABLE` entries.

Method: every config is first checked against ``reference.gemv`` (a wrong config is never a winner),
then timed by ``timer`` (on the GPU: :func:`benchmark.time_ms`, many calls in one CUDA graph, CUDA
events, median of trials). Weights smaller than ``rotate_bytes`` (3x the 50 MB L2 of an H100/H200) are
cycled through several copies, so each call reads its weight from HBM as the model does (x and y stay
small and may hit L2, as in the model). After timing, each config runs again and must give the same bits
(split-K's counters reset, its reduction is deterministic). Phase 1 sweeps tiles and split-K at 3 stages;
phase 2 re-times the best tile at 2 and 4 stages when it is a tl.dot one (Triton pipelines only loads
that feed a dot; for the FMA tiles ``num_stages`` changes nothing). ``budget_s`` bounds the sweep: past it, remaining
shapes get cuBLAS only (their rows say so).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import gemv as _gemv_module
from . import reference
from .activation import silu_and_mul
from .gemv import GemvConfig, gemv, gemv_silu_and_mul, m_bucket

GB = 1e9


@dataclass(frozen=True)
class GemvShape:
    name: str
    op: str  # "linear" or "gate_up_silu" (then n = 2 * intermediate)
    n: int
    k: int
    bias: bool = False


def decode_shapes(model: str, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                  vocab: int | None = None, qkv_bias: bool = False, tp: int = 1) -> list[GemvShape]:
    """One decoder layer's projections (and the LM head when ``vocab``) as a TP rank of ``tp`` holds them:
    qkv / gate_up / head column-sharded, o_proj / down row-sharded (KV heads replicated below tp)."""
    q = heads // tp * head_dim
    kv = max(1, kv_heads // tp) * head_dim
    inter = intermediate // tp
    tag = model if tp == 1 else f"{model}-tp{tp}"
    shapes = [
        GemvShape(f"{tag}/qkv", "linear", q + 2 * kv, hidden, qkv_bias),
        GemvShape(f"{tag}/o_proj", "linear", hidden, q),
        GemvShape(f"{tag}/gate_up", "linear", 2 * inter, hidden),
        GemvShape(f"{tag}/gate_up+silu", "gate_up_silu", 2 * inter, hidden),
        GemvShape(f"{tag}/down", "linear", hidden, inter),
    ]
    if vocab:
        shapes.append(GemvShape(f"{tag}/lm_head", "linear", math.ceil(vocab / tp), hidden))
    return shapes


def default_shapes(tp: int = 1) -> list[GemvShape]:
    """Llama-3.1-8B (with its LM head) and Qwen2.5-0.5B (qkv bias)."""
    return (decode_shapes("8b", 4096, 14336, 32, 8, 128, vocab=128256, tp=tp)
            + decode_shapes("0.5b", 896, 4864, 14, 2, 64, qkv_bias=True, tp=tp))


def _tiles(bm: int) -> list[tuple[int, int, int, bool]]:
    """(block_n, block_k, num_warps, dot) to try at an M bucket. FMA tiles keep BLOCK_M x BLOCK_N x BLOCK_K
    fp32 accumulators at ~32-64 registers a thread; tl.dot tiles pad M to 16."""
    fma = {1: [(8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8)],
           2: [(8, 256, 4), (16, 256, 8), (32, 128, 8)],
           4: [(8, 256, 4), (16, 128, 4)],
           8: [(8, 128, 4), (16, 64, 4)]}[bm]
    dot = [(32, 128, 4), (64, 128, 4)] + ([(32, 256, 8)] if bm == 8 else [])
    return [(n, k, w, False) for n, k, w in fma] + [(n, k, w, True) for n, k, w in dot]


def _splits(n: int, block_n: int, num_sms: int) -> list[int]:
    """1, the split that first gives two programs per SM, and twice that (at most 16)."""
    blocks = math.ceil(n / block_n)
    fill = 1
    while blocks * fill < 2 * num_sms and fill < 16:
        fill *= 2
    return sorted({1, fill, min(16, 2 * fill)})


def gemv_grid(n: int, k: int, m: int, num_sms: int, stages: int = 3) -> list[GemvConfig]:
    """The phase-1 configs of one shape: each tile unsplit and at the splits that fill the GPU; a split
    that leaves a program less than one chunk of K halves BLOCK_K (down to 64) or is dropped."""
    out = []
    for block_n, block_k, warps, dot in _tiles(m_bucket(m)):
        for split in _splits(n, block_n, num_sms):
            bk = block_k
            while bk > 64 and k < split * bk:
                bk //= 2
            cfg = GemvConfig(block_n, bk, split, warps, stages, dot)
            if k >= split * bk and cfg not in out:
                out.append(cfg)
    return out


def _compact(cfg: GemvConfig) -> str:
    return (f"n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages} "
            f"{'dot' if cfg.dot else 'fma'}")


def _cycled(calls: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    it = itertools.cycle(calls)
    return lambda: next(it)()


def bench_gemv(
    shapes: list[GemvShape] | None = None,
    ms: tuple[int, ...] = (1, 2, 4, 8),
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    timer: Callable[[Callable[[], object], int], float] | None = None,
    grid: Callable[[int, int, int, int], list[GemvConfig]] = gemv_grid,
    stage_variants: tuple[int, ...] = (2, 4),
    rotate_bytes: int = 150 * 10**6,
    max_copies: int = 64,
    budget_s: float = 210.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
    """Every measurement, one dict each: ``impl`` ``cublas`` or ``triton`` (with its config), ``us`` per
    call, ``GBps`` (weight + x + y + bias bytes per call), ``ok`` (matches the reference and repeats
    bit-exactly), ``error`` when a config failed to compile or run. ``timer(fn, reps)`` -> ms per call."""
    if timer is None:
        from .benchmark import time_ms

        def timer(fn, reps):
            return time_ms(fn, reps=reps, trials=5)

    shapes = default_shapes() if shapes is None else shapes
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device == "cuda" else 4
    elt = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    start = clock()
    rows: list[dict] = []
    for shape in shapes:
        w_bytes = shape.n * shape.k * elt
        copies = max(1, min(max_copies, math.ceil(rotate_bytes / w_bytes)))
        weights = [torch.randn(shape.n, shape.k, generator=g, device=device).div_(shape.k**0.5).to(dtype)
                   for _ in range(copies)]
        biases = [torch.randn(shape.n, generator=g, device=device).to(dtype) if shape.bias else None
                  for _ in range(copies)]
        out_n = shape.n // 2 if shape.op == "gate_up_silu" else shape.n
        for m in ms:
            x = torch.randn(m, shape.k, generator=g, device=device).to(dtype)
            moved = w_bytes + (m * shape.k + m * out_n + (shape.n if shape.bias else 0)) * elt
            reps = copies * max(1, math.ceil(20 / copies))
            base = dict(shape=shape.name, op=shape.op, N=shape.n, K=shape.k, M=m, bias=shape.bias,
                        weight_copies=copies, bytes=moved)
            if shape.op == "gate_up_silu":
                want = reference.gemv_silu_and_mul(x, weights[0], biases[0])
                torch_call = lambda w, b: silu_and_mul(F.linear(x, w, b))  # noqa: E731
                kernel = gemv_silu_and_mul
            else:
                want = reference.gemv(x, weights[0], biases[0])
                torch_call = lambda w, b: F.linear(x, w, b)  # noqa: E731
                kernel = gemv

            def measure(impl: str, call: Callable, cfg: GemvConfig | None) -> dict:
                row = dict(base, impl=impl, config=None if cfg is None else asdict(cfg),
                           config_str="cuBLAS" if cfg is None else _compact(cfg))
                try:
                    first = call(weights[0], biases[0])
                    ok = bool(torch.allclose(first.float(), want.float(), atol=2e-2, rtol=2e-2))
                    row["max_abs_err"] = float((first.float() - want.float()).abs().max())
                    ms_ = timer(_cycled([lambda w=w, b=b: call(w, b) for w, b in zip(weights, biases)]), reps)
                    again = call(weights[0], biases[0])
                    row["deterministic"] = bool(torch.equal(first, again))
                    row.update(ok=ok and row["deterministic"], us=ms_ * 1e3,
                               GBps=moved / (ms_ * 1e-3) / GB)
                except Exception as exc:  # a config that does not compile or run is a row, not a crash
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                finally:  # fresh split-K counters: a config that left them dirty cannot spoil the next
                    _gemv_module.reset_split_counters()
                rows.append(row)
                return row

            measure("cublas", torch_call, None)
            if clock() - start > budget_s:
                rows.append(dict(base, impl="triton", ok=False, error=f"skipped: budget_s={budget_s} spent"))
                continue
            tried = [measure("triton", lambda w, b, c=cfg: kernel(x, w, b, c), cfg)
                     for cfg in grid(shape.n, shape.k, m, num_sms)]
            good = [r for r in tried if r["ok"]]
            best = GemvConfig(**min(good, key=lambda r: r["us"])["config"]) if good else None
            if best is not None and best.dot:  # only tl.dot's loads are pipelined: stages mean nothing to FMA
                for st in stage_variants:
                    if st != best.num_stages:
                        cfg = GemvConfig(**{**asdict(best), "num_stages": st})
                        measure("triton", lambda w, b, c=cfg: kernel(x, w, b, c), cfg)
        del weights, biases
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict], copy_GBps: float) -> list[dict]:
    """One row per (shape, M): cuBLAS against the fastest correct config, each as % of copy bandwidth."""
    out = []
    keys = dict.fromkeys((r["shape"], r["M"]) for r in rows)
    for shape, m in keys:
        group = [r for r in rows if r["shape"] == shape and r["M"] == m]
        cublas = next((r for r in group if r["impl"] == "cublas" and "us" in r), None)
        good = [r for r in group if r["impl"] == "triton" and r.get("ok")]
        best = min(good, key=lambda r: r["us"]) if good else None
        first = group[0]
        out.append({
            "shape": shape, "N": first["N"], "K": first["K"], "M": m,
            "MB": first["bytes"] / 1e6,
            "cublas_us": cublas["us"] if cublas else None,
            "cublas_pct_bw": 100 * cublas["GBps"] / copy_GBps if cublas else None,
            "triton_us": best["us"] if best else None,
            "config": best["config_str"] if best else None,
            "GBps": best["GBps"] if best else None,
            "pct_bw": 100 * best["GBps"] / copy_GBps if best else None,
            "speedup": cublas["us"] / best["us"] if best and cublas else None,
            "configs_ok": f"{len(good)}/{sum(r['impl'] == 'triton' for r in group)}",
        })
    return out


def table_entries(rows: list[dict], margin: float = 0.03) -> dict[tuple[str, int, int], dict[int, GemvConfig]]:
    """The GEMV_TABLE the measurements support: a config where it beats cuBLAS by more than ``margin``.
    A shape benchmarked at several names (none today) keeps its first winner."""
    table: dict[tuple[str, int, int], dict[int, GemvConfig]] = {}
    groups = dict.fromkeys((r["op"], r["N"], r["K"], r["M"]) for r in rows)
    for op, n, k, m in groups:
        group = [r for r in rows if (r["op"], r["N"], r["K"], r["M"]) == (op, n, k, m)]
        cublas = [r["us"] for r in group if r["impl"] == "cublas" and "us" in r]
        good = [r for r in group if r["impl"] == "triton" and r.get("ok")]
        if not cublas or not good:
            continue
        best = min(good, key=lambda r: r["us"])
        if best["us"] < min(cublas) * (1 - margin) and m == m_bucket(m):
            table.setdefault((op, n, k), {}).setdefault(m, GemvConfig(**best["config"]))
    return table


def table_source(table: dict[tuple[str, int, int], dict[int, GemvConfig]]) -> str:
    """``table`` as Python to paste into kernels/gemv.py."""
    lines = ["GEMV_TABLE: dict[tuple[str, int, int], dict[int, GemvConfig]] = {"]
    for key in sorted(table):
        lines.append(f"    {key!r}: {{")
        for m in sorted(table[key]):
            c = table[key][m]
            lines.append(f"        {m}: GemvConfig(block_n={c.block_n}, block_k={c.block_k}, split_k={c.split_k}, "
                         f"num_warps={c.num_warps}, num_stages={c.num_stages}, dot={c.dot}),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)
