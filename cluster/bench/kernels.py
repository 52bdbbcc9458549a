"""``shoal bench kernels``: the Triton kernels in GB/s and TFLOP/s, beside the copy bandwidth and
bf16 matmul peak measured in the same run (the measurements live in ``shoal.kernels.benchmark``)."""

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
    p.add_argument("--result-file", default=None)


def run_from_args(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("shoal bench kernels needs a CUDA GPU")
    from shoal.kernels import benchmark as kb

    from . import ceilings

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
