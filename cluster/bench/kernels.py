"""``shoal bench kernels``: the Triton kernels in GB/s and TFLOP/s, beside the copy bandwidth and
bf16 matmul peak measured in the same run (the measurements live in ``shoal.kernels.benchmark``).

``--gemv`` runs only the skinny-GEMM sweep instead (``shoal.kernels.benchmark_gemv``): cuBLAS against
the gemv kernel's config grid at decode shapes, and the ``GEMV_TABLE`` it supports, as Python."""

from __future__ import annotations

import argparse

from .report import environment, format_table, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", default="1,16,64,256", help="decode batch sizes")
    p.add_argument("--contexts", default="512,1024,4096,8192,16384,32768", help="decode context lengths")
    p.add_argument("--prefill-lens", default="1024,4096,8192,16384", help="prefill lengths (tokens)")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sweep-splits", action="store_true",
                   help="time decode attention at every split-KV count, not only the heuristic's and 1")
    p.add_argument("--gemv", action="store_true",
                   help="only the skinny-GEMM sweep (M <= 8): cuBLAS vs the gemv kernel's configs, and the "
                        "GEMV_TABLE entries it would choose")
    p.add_argument("--gemv-ms", default="1,2,4,8", help="token counts M for --gemv")
    p.add_argument("--gemv-tp", default="1", help="tensor-parallel sizes whose shard shapes --gemv times")
    p.add_argument("--gemv-shapes", default="", help="only shapes whose name contains one of these (comma list)")
    p.add_argument("--gemv-budget-s", type=float, default=210.0,
                   help="stop sweeping configs after this long (later shapes: cuBLAS only)")
    p.add_argument("--gemv-margin", type=float, default=0.03,
                   help="a config enters the table when faster than cuBLAS by more than this fraction")
    p.add_argument("--result-file", default=None)


def run_from_args(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("shoal bench kernels needs a CUDA GPU")
    from shoal.kernels import benchmark as kb

    from . import ceilings

    if args.gemv:
        return run_gemv(args, copy_GBps=ceilings.copy_bandwidth() / 1e9)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    shape = dict(num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                 block_size=args.block_size)
    payload = {"benchmark": "kernels", "env": environment(), "ceilings": ceilings.measure(), "shape": shape}
    payload["decode_attention"] = kb.bench_decode_attention(ints(args.batches), ints(args.contexts),
                                                           sweep_splits=args.sweep_splits, **shape)
    payload["prefill_attention"] = kb.bench_prefill_attention(ints(args.prefill_lens), **shape)
    payload["small_kernels"] = kb.bench_small_kernels()
    bw = payload["ceilings"]["copy_bandwidth_GBps"]
    peak = payload["ceilings"]["bf16_matmul_TFLOPs"]
    for row in payload["decode_attention"]:
        row["pct_of_copy_bw"] = 100 * row["GBps"] / bw
    for row in payload["prefill_attention"]:
        row["pct_of_matmul_peak"] = 100 * row["TFLOPs"] / peak
    print(f"copy bandwidth {bw:,.0f} GB/s, bf16 matmul peak {peak:,.0f} TFLOP/s")
    print(format_table(payload["decode_attention"], title="decode attention"))
    print(format_table(payload["prefill_attention"], title="prefill attention"))
    print(format_table(payload["small_kernels"], title="small kernels"))
    write_json(args.result_file, payload)
    return payload


def run_gemv(args: argparse.Namespace, *, copy_GBps: float, device: str = "cuda", timer=None,
             grid=None, shapes=None) -> dict:
    """The ``--gemv`` sweep: prints the per-shape table and the GEMV_TABLE source, writes every
    measurement. ``device``/``timer``/``grid``/``shapes`` are injectable so the path runs on CPU in tests."""
    import time

    from shoal.kernels import benchmark_gemv as bg

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if shapes is None:
        shapes = [s for tp in ints(args.gemv_tp) for s in bg.default_shapes(tp)]
    wanted = [w for w in args.gemv_shapes.split(",") if w]
    if wanted:
        shapes = [s for s in shapes if any(w in s.name for w in wanted)]
    kw = {} if grid is None else {"grid": grid}
    t0 = time.monotonic()
    rows = bg.bench_gemv(shapes, tuple(ints(args.gemv_ms)), device=device, timer=timer,
                         budget_s=args.gemv_budget_s, **kw)
    for row in rows:
        if "GBps" in row:
            row["pct_of_copy_bw"] = 100 * row["GBps"] / copy_GBps
    summary = bg.summarize(rows, copy_GBps)
    table = bg.table_entries(rows, margin=args.gemv_margin)
    source = bg.table_source(table)
    payload = {"benchmark": "kernels-gemv", "env": environment(), "copy_bandwidth_GBps": copy_GBps,
               "elapsed_s": time.monotonic() - t0, "summary": summary, "measurements": rows,
               "gemv_table_source": source}
    print(f"copy bandwidth {copy_GBps:,.0f} GB/s; {len(rows)} measurements in {payload['elapsed_s']:.0f} s")
    print(format_table(summary, title="skinny GEMMs: cuBLAS vs the best gemv config (pct_bw: of copy bandwidth)"))
    failed = [r for r in rows if r["impl"] == "triton" and not r.get("ok")]
    if failed:
        print(f"{len(failed)} gemv configs failed or were skipped (see 'error' / 'ok' in the JSON), e.g.:")
        for r in failed[:5]:
            print(f"  {r['shape']} M={r['M']} {r.get('config_str', '')}: "
                  f"{r.get('error') or 'max_abs_err %.3g deterministic %s' % (r.get('max_abs_err', -1), r.get('deterministic'))}")
    print("# paste into kernels/gemv.py (shapes where gemv beats cuBLAS by > "
          f"{100 * args.gemv_margin:.0f} %):")
    print(source)
    write_json(args.result_file, payload)
    return payload
