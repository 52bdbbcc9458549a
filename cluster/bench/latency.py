"""``shoal bench latency``: batch-1 decode step time against the memory roofline.

A decode step must read every weight once (the embedding only one row) and the KV cache of its
context: (weight bytes + KV bytes) / measured bandwidth is the fastest it can be.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from .report import engine_settings, environment, format_table, write_json


def decode_step_times(llm, prompt_len: int, decode_steps: int, seed: int = 0) -> list[float]:
    """Seconds of each decode step (the prefill step excluded) for one greedy request."""
    import torch

    from shoal.workers import SamplingParams

    rng = random.Random(seed)
    vocab = llm.engine.model_config.vocab_size
    engine = llm.engine
    engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)],
                       SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # No sync between steps: with async scheduling a step returns while the next one runs, so the
    # time between two returns is the time per token (a sync here would hide the device's part).
    # Without it each step already waits for its sampled id. The first two calls (the prefill, and
    # under async the first collect) are left out; the median ignores the drain at the end.
    times = []
    last = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        now = time.perf_counter()
        if n >= 2:
            times.append(now - last)
        last, n = now, n + 1
    return times


def graph_replay_ms(llm, iters: int = 50) -> float | None:
    """Device time of the captured batch-1 decode forward (no scheduling, sampling or host work)."""
    import torch

    if llm.engine.tp is not None:
        return None  # rank 0's graph alone would wait in its all-reduce for ranks that do not replay
    graphs = llm.engine.runner.graphs
    if graphs is None or graphs.size_for(1) is None:
        return None
    bs = graphs.size_for(1)
    for _ in range(3):
        graphs.replay(bs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graphs.replay(bs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def step_profile_ms(llm) -> dict[str, float]:
    """Mean milliseconds per engine step of each part: scheduling, the executor (rank 0's view, with
    the broadcast to other ranks), and inside rank 0's runner: input prep, launch, sampling wait."""
    core, runner = llm.engine.core.times, llm.engine.runner.times
    steps = max(core.steps, 1)
    return {"schedule": core.schedule_s / steps * 1e3, "execute": core.execute_s / steps * 1e3,
            "update": core.update_s / steps * 1e3, "runner_prepare": runner.prepare_s / steps * 1e3,
            "runner_forward": runner.forward_s / steps * 1e3, "runner_sample": runner.sample_s / steps * 1e3,
            "runner_sample_launch": runner.sample_launch_s / steps * 1e3,
            "runner_sample_wait": runner.sample_wait_s / steps * 1e3,
            "runner_gpu": runner.gpu_s / steps * 1e3, "runner_gpu_forward": runner.gpu_forward_s / steps * 1e3,
            "runner_gpu_sample": runner.gpu_sample_s / steps * 1e3}


def roofline_bytes(model, context: int, dtype_bytes: int) -> tuple[int, int]:
    """(weight bytes a decode step reads, KV bytes it reads at ``context`` tokens)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    if not cfg.tie_word_embeddings:
        params -= model.model.embed_tokens.weight.numel()  # only one row of the embedding is read
    # Per GPU: a tensor-parallel rank reads its own shard of the weights and of the KV heads.
    kv_heads = model.model.layers[0].self_attn.num_local_kv_heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * cfg.head_dim * context
    return params * dtype_bytes, kv * dtype_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.cluster.flags import add_engine_args

    p.add_argument("--prompt-lens", default="128,1024,4096", help="comma-separated contexts")
    p.add_argument("--decode-steps", type=int, default=128)
    p.add_argument("--result-file", default=None)
    add_engine_args(p)
    p.set_defaults(model="llama-3.1-8b", load_format="dummy", max_num_seqs=8)


def run_from_args(args: argparse.Namespace) -> dict:
    import torch

    from shoal.cluster.flags import engine_kwargs
    from shoal.workers import LLM

    from . import ceilings

    payload = {"benchmark": "latency", "model": args.model, "env": environment()}
    bandwidth = None
    if torch.cuda.is_available():
        payload["ceilings"] = ceilings.measure()
        bandwidth = payload["ceilings"]["copy_bandwidth_GBps"] * 1e9
    llm = LLM(args.model, **engine_kwargs(args))
    payload["engine_settings"] = engine_settings(llm.engine)
    dtype_bytes = next(llm.engine.model.parameters()).element_size()
    decode_step_times(llm, 32, 8)  # warm up
    rows = []
    for prompt_len in (int(x) for x in args.prompt_lens.split(",")):
        times = decode_step_times(llm, prompt_len, args.decode_steps)
        step = statistics.median(times)
        w, kv = roofline_bytes(llm.engine.model, prompt_len + args.decode_steps // 2, dtype_bytes)
        row = {"context": prompt_len, "decode_steps": len(times), "median_step_ms": step * 1e3,
               "p90_step_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
               "tok_per_s": 1 / step, "weight_GB": w / 1e9, "kv_GB": kv / 1e9}
        if bandwidth:
            row["roofline_ms"] = (w + kv) / bandwidth * 1e3
            row["pct_of_roofline"] = 100 * row["roofline_ms"] / row["median_step_ms"]
        rows.append(row)
    payload["graph_replay_ms"] = graph_replay_ms(llm)
    payload["step_profile_ms"] = step_profile_ms(llm)
    payload["results"] = rows
    print(format_table(rows, title=f"batch-1 decode latency, {args.model}"))
    for k, v in payload.get("ceilings", {}).items():
        print(f"{k}: {v:,.1f}")
    print("per step on rank 0 (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in payload["step_profile_ms"].items()))
    if payload["graph_replay_ms"] is not None:
        print(f"GPU time of the batch-1 forward alone (CUDA graph replay): {payload['graph_replay_ms']:.3f} ms")
    write_json(args.result_file, payload)
    llm.shutdown()  # tensor-parallel ranks, if any
    return payload
