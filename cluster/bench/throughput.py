"""``shoal bench throughput``: offline generation throughput, shoal beside HF transformers.

Workload (a): uniform input and output lengths in [100, 1024], ignore_eos. Workload (b): a
ShareGPT-like length mix (log-normal, mean about 215 in / 200 out) from a fixed seed. Both use random
token ids, so dummy weights of a preset shape are enough. HF ``generate_batch`` runs on the same
weights on a stated subset (same prompts, one fixed output length for both engines), and the ratio is
printed beside the device ceilings measured in the same run.

``--json-schema`` (``builtin`` or a schema file) runs the same workload with that JSON-schema
constraint on every request (grammar-masked sampling), alternating ``--json-schema-pairs`` times with
the unconstrained run (a shared machine's load drifts: alternation and the best of each side keep it
out of the ratio), and prints constrained / unconstrained tokens/s. The builtin schema is an array of
at least 100,000 small objects, so no request's grammar completes before its max_tokens: both sides
generate the same number of tokens.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time

from .report import engine_settings, environment, format_table, write_json


def workload_a(num_prompts: int, vocab: int, seed: int, lo: int = 100, hi: int = 1024):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi))
            for _ in range(num_prompts)]


def workload_b(num_prompts: int, vocab: int, seed: int, mean_in: float = 215, mean_out: float = 200,
               sigma: float = 0.9, cap: int = 2048):
    """Log-normal lengths (ShareGPT's shape: many short turns, a long tail), clipped to [4, cap]."""
    rng = random.Random(seed)

    def length(mean: float) -> int:
        mu = math.log(mean) - sigma**2 / 2  # so the unclipped mean is `mean`
        return max(4, min(cap, int(rng.lognormvariate(mu, sigma))))

    return [([rng.randrange(vocab) for _ in range(length(mean_in))], length(mean_out))
            for _ in range(num_prompts)]


# Objects with a bounded integer, a bounded string and an enum, repeated past any max_tokens.
BUILTIN_SCHEMA = {"type": "array", "minItems": 100_000, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "kind"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999},
                   "name": {"type": "string", "maxLength": 16}, "kind": {"enum": ["alpha", "beta", "gamma"]}}}}


def load_schema(value: str) -> dict:
    import json

    if value == "builtin":
        return BUILTIN_SCHEMA
    with open(value) as f:
        return json.load(f)


def run_shoal(llm, workload, temperature: float = 1.0, schema: dict | None = None) -> dict:
    from shoal.workers import SamplingParams, StructuredOutputs

    prompts = [p for p, _ in workload]
    structured = StructuredOutputs.json_schema(schema) if schema is not None else None
    params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, structured_outputs=structured)
              for _, n in workload]
    before = step_profile(llm.engine)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    after = step_profile(llm.engine)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    profile = {k: after[k] - before[k] for k in after}
    profile["other_s"] = elapsed - profile["schedule_s"] - profile["execute_s"] - profile["update_s"]
    profile.update(overlap_profile(profile, elapsed))
    profile["async_scheduling"] = llm.engine.async_scheduling
    return {"engine": "shoal" if schema is None else "shoal, JSON schema", "requests": len(prompts),
            "input_tokens": in_tokens, "output_tokens": out_tokens, "seconds": elapsed,
            "output_tok_per_s": out_tokens / elapsed,
            "total_tok_per_s": (in_tokens + out_tokens) / elapsed, "req_per_s": len(prompts) / elapsed,
            "profile": profile}


def compare_json_schema(llm, work, schema: dict, pairs: int) -> dict:
    """Alternating unconstrained and constrained runs of ``work``; the ratio of the best of each."""
    run_shoal(llm, work[:4], schema=schema)  # warm up: the grammar compiled and cached
    runs = []
    for i in range(pairs):
        for constrained in (None, schema):
            runs.append({"run": f"pair {i + 1}", **run_shoal(llm, work, schema=constrained)})
    free = max((r for r in runs if r["engine"] == "shoal"), key=lambda r: r["output_tok_per_s"])
    best = max((r for r in runs if r["engine"] != "shoal"), key=lambda r: r["output_tok_per_s"])
    return {"json_schema": schema, "json_schema_runs": runs, "json_schema_best": best,
            "constrained_vs_unconstrained": best["output_tok_per_s"] / free["output_tok_per_s"]}


def profile_kernels(llm, workload, top: int = 25) -> list[dict]:
    """GPU time per kernel over one run of ``workload`` (torch profiler), most expensive first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_shoal(llm, workload)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    rows = sorted(({"kernel": e.key[:90], "calls": e.count, "gpu_ms": e.self_device_time_total / 1e3,
                    "pct": 100 * e.self_device_time_total / total} for e in events),
                  key=lambda r: -r["gpu_ms"])[:top]
    print(format_table(rows, ["kernel", "calls", "gpu_ms", "pct"], title="GPU time by kernel"))
    return rows


def step_profile(engine) -> dict:
    """Where the engine's time went so far: the core's step parts and the runner's breakdown."""
    core, runner = engine.core.times, engine.runner.times
    return {"steps": core.steps, "schedule_s": core.schedule_s, "execute_s": core.execute_s,
            "update_s": core.update_s, **runner.as_dict()}


def overlap_profile(profile: dict, elapsed: float) -> dict:
    """How much host work the device hid. ``host_s``: wall time the host was not blocked on the device
    (scheduling, input prep, launches, updates, detokenizing); ``gpu_idle_s``: wall time the device
    was not running a step (on CPU: all of it); ``overlap_s`` = host_s - gpu_idle_s: host work done
    while the device was busy (async scheduling raises it; a host-bound run without it is near 0)."""
    host = elapsed - profile.get("sample_wait_s", 0.0)
    idle = elapsed - profile.get("gpu_s", 0.0)
    return {"host_s": host, "gpu_idle_s": idle, "overlap_s": max(host - idle, 0.0)}


def format_profile(profile: dict, elapsed: float) -> str:
    parts = ["schedule_s", "prepare_s", "forward_s", "sample_s", "update_s", "other_s"]
    rows = [{"part": k[:-2], "seconds": profile[k], "pct": 100 * profile[k] / elapsed} for k in parts]
    for k, name in (("sample_launch_s", "  sample: lm_head + sampler launch"),
                    ("sample_wait_s", "  sample: wait for the GPU"),
                    ("gpu_s", "gpu busy (events)"), ("gpu_forward_s", "  gpu: forward"),
                    ("gpu_sample_s", "  gpu: lm_head + sampling"), ("host_s", "host busy (not waiting)"),
                    ("gpu_idle_s", "gpu idle"), ("overlap_s", "host work hidden behind the gpu")):
        if k in profile:
            rows.append({"part": name, "seconds": profile[k], "pct": 100 * profile[k] / elapsed})
    mode = "async scheduling" if profile.get("async_scheduling") else "sync scheduling"
    title = (f"where the time went: {profile['steps']} steps ({profile['graph_steps']} graph, "
             f"{profile['eager_steps']} eager), {1e3 * elapsed / max(profile['steps'], 1):.2f} ms/step, {mode}")
    return format_table(rows, ["part", "seconds", "pct"], title=title)


def hf_model(hf_cfg: dict, state: dict, dtype, device: str):
    """An HF transformers model of ``hf_cfg`` holding ``state`` (shoal's weights, HF names)."""
    import torch
    import transformers

    arch = hf_cfg["architectures"][0]
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]
    cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in hf_cfg.items()
                                                           if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = getattr(transformers, arch)(cfg).to(dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def run_hf(model, workload, max_new_tokens: int) -> dict:
    import transformers

    prompts = [p for p, _ in workload]
    gen = transformers.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.generated_tokens) for o in outs.values())
    in_tokens = sum(len(p) for p in prompts)
    return {"engine": "hf generate_batch", "requests": len(prompts), "input_tokens": in_tokens,
            "output_tokens": out_tokens, "seconds": elapsed, "output_tok_per_s": out_tokens / elapsed,
            "total_tok_per_s": (in_tokens + out_tokens) / elapsed, "req_per_s": len(prompts) / elapsed}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.cluster.flags import add_engine_args

    p.add_argument("--workload", choices=["a", "b"], default="a")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 256 for (a), 1000 for (b)")
    p.add_argument("--input-len", type=int, default=None, help="every prompt this long (random ids)")
    p.add_argument("--output-len", type=int, default=None, help="every request generates this many tokens")
    p.add_argument("--json-schema", default=None, metavar="builtin|PATH",
                   help="also run the workload with this JSON-schema constraint on every request "
                        "(needs a model with a tokenizer)")
    p.add_argument("--json-schema-pairs", type=int, default=3,
                   help="unconstrained / constrained runs, alternating, with --json-schema")
    p.add_argument("--hf-subset", type=int, default=64, help="prompts HF runs (0: skip HF)")
    p.add_argument("--hf-output-len", type=int, default=128, help="fixed output length of the HF comparison")
    p.add_argument("--profile-kernels", type=int, default=0, metavar="N",
                   help="also run N prompts under the torch profiler and print the top GPU kernels")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring bandwidth / matmul peak")
    p.add_argument("--result-file", default=None, help="write the results as JSON here")
    add_engine_args(p)
    p.set_defaults(model="qwen2.5-0.5b", load_format="dummy")


def run_from_args(args: argparse.Namespace) -> dict:
    import torch

    from shoal.cluster.flags import engine_kwargs
    from shoal.workers import LLM
    from shoal.workers.device import torch_device
    from shoal.workers.models.fusion import hf_state_dict
    from shoal.workers.models.loader import resolve_model

    from . import ceilings

    n = args.num_prompts or (256 if args.workload == "a" else 1000)
    payload = {"benchmark": "throughput", "workload": args.workload, "model": args.model,
               "env": environment()}
    if torch.cuda.is_available() and not args.no_ceilings:
        payload["ceilings"] = ceilings.measure()
    llm = LLM(args.model, **engine_kwargs(args))
    payload["engine_settings"] = engine_settings(llm.engine)
    vocab = llm.engine.model_config.vocab_size
    make = workload_a if args.workload == "a" else workload_b
    work = make(n, vocab, args.seed)
    if args.input_len or args.output_len:
        rng = random.Random(args.seed)
        work = [([rng.randrange(vocab) for _ in range(args.input_len)] if args.input_len else p,
                 args.output_len or o) for p, o in work]
    payload["mean_input_len"] = sum(len(p) for p, _ in work) / n
    payload["mean_output_len"] = sum(o for _, o in work) / n
    run_shoal(llm, work[: min(16, n)])  # warm up: kernels compiled, graphs and allocator settled
    rows = [{"run": f"full ({n} prompts)", **run_shoal(llm, work)}]
    if args.json_schema:
        payload.update(compare_json_schema(llm, work, load_schema(args.json_schema), args.json_schema_pairs))
    if args.profile_kernels:
        payload["kernel_profile"] = profile_kernels(llm, work[: args.profile_kernels])
    if args.hf_subset > 0:
        subset = [(p, args.hf_output_len) for p, _ in work[: args.hf_subset]]
        rows.append({"run": f"subset ({len(subset)} x {args.hf_output_len} out)", **run_shoal(llm, subset)})
        # Free the engine (and its KV cache) before HF loads the same weights.
        state = {k: v.cpu() for k, v in hf_state_dict(llm.engine.model).items()}
        dtype = next(llm.engine.model.parameters()).dtype
        device = str(torch_device(llm.engine.config))
        hf_cfg = dict(resolve_model(args.model).hf_config)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            hf = hf_model(hf_cfg, state, dtype, device)
            run_hf(hf, subset[:4], 8)  # warm up
            rows.append({"run": f"subset ({len(subset)} x {args.hf_output_len} out)",
                         **run_hf(hf, subset, args.hf_output_len)})
            payload["speedup_vs_hf"] = rows[1]["output_tok_per_s"] / rows[2]["output_tok_per_s"]
        except Exception as e:  # report, don't lose the shoal numbers
            payload["hf_error"] = f"{type(e).__name__}: {e}"
    payload["results"] = rows
    cols = ["run", "engine", "requests", "input_tokens", "output_tokens", "seconds",
            "output_tok_per_s", "req_per_s"]
    table = rows[:1] + payload.get("json_schema_runs", []) + rows[1:]
    print(format_table(table, cols, title=f"throughput, workload ({args.workload}), {args.model}"))
    print(format_profile(rows[0]["profile"], rows[0]["seconds"]))
    if args.json_schema:
        best = payload["json_schema_best"]
        print(format_profile(best["profile"], best["seconds"]))
        print(f"JSON schema / unconstrained output tok/s (best of {args.json_schema_pairs} each): "
              f"{payload['constrained_vs_unconstrained']:.3f}")
    for k, v in payload.get("ceilings", {}).items():
        print(f"{k}: {v:,.1f}")
    if "speedup_vs_hf" in payload:
        print(f"shoal / HF generate_batch (same subset, same weights): {payload['speedup_vs_hf']:.1f}x")
    if "hf_error" in payload:
        print(f"HF run failed: {payload['hf_error']}")
    write_json(args.result_file, payload)
    return payload
