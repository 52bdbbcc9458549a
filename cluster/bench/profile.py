"""``shoal bench profile``: measure a worker's profile on the real engine (the ``slo`` policy's input).

* prefill: one prompt of each length alone, the median time of the step that prefills it (prefix
  caching off, so every repeat computes the whole prompt);
* decode: ``batch`` requests of ``context`` tokens each, prefilled first, then the median step time of
  ``--decode-steps`` decode steps;
* cold start: the seconds ``LLM(...)`` takes to load (a fresh replica's engine start).

Writes a :class:`~shoal.cluster.autoscale.profile.Profile` JSON (``--output``) that ``shoal bench
autoscale --profile`` and the ``slo`` policy read.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from shoal.cluster.autoscale.profile import Profile

from .report import engine_settings, environment, format_table, write_json


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def prefill_time(llm, prompt_len: int, repeats: int, rng: random.Random) -> float:
    from shoal.workers import SamplingParams

    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    times = []
    for _ in range(repeats):
        engine.add_request(_ids(rng, vocab, prompt_len), SamplingParams(temperature=0, max_tokens=1,
                                                                        ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_step_time(llm, batch: int, context: int, steps: int, rng: random.Random) -> float:
    from shoal.workers import SamplingParams

    engine, vocab = llm.engine, llm.engine.model_config.vocab_size
    for _ in range(batch):
        engine.add_request(_ids(rng, vocab, context), SamplingParams(temperature=0, max_tokens=steps + 2,
                                                                     ignore_eos=True))
    # Prefill steps: every prompt's tokens through the step token budget (plus one for the remainder).
    for _ in range(-(-batch * context // engine.scheduler.config.max_num_batched_tokens) + 1):
        engine.step()
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[: max(1, steps)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    from shoal.cluster.flags import add_engine_args

    p.add_argument("--prefill-lens", default="16,64,256,512,1024", help="comma-separated prompt lengths")
    p.add_argument("--batches", default="1,4,16,32", help="comma-separated decode batch sizes")
    p.add_argument("--contexts", default="128,512", help="comma-separated decode contexts")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None, help="the profile JSON to write")
    p.add_argument("--result-file", default=None)
    add_engine_args(p)
    p.set_defaults(enable_prefix_caching=False)


def measure(llm, model: str, cold_start_s: float, lens, batches, contexts, decode_steps: int = 8,
            repeats: int = 3) -> Profile:
    """The :class:`Profile` of a loaded ``LLM``: prefill times by prompt length, decode step times by
    batch and context (``cold_start_s``: what loading it took)."""
    rng = random.Random(0)
    env, settings = environment(), engine_settings(llm.engine)
    prefill_time(llm, 32, 1, rng)  # warm up
    prefill = [prefill_time(llm, n, repeats, rng) for n in lens]
    decode = [[decode_step_time(llm, b, c, decode_steps, rng) for c in contexts] for b in batches]
    return Profile(model=model, device=env["device"], prefill_lens=tuple(lens), prefill_s=tuple(prefill),
                   decode_batches=tuple(batches), decode_contexts=tuple(contexts),
                   decode_step_s=tuple(tuple(r) for r in decode), cold_start_s=cold_start_s,
                   max_num_seqs=settings["max_num_seqs"], max_num_batched_tokens=settings["max_num_batched_tokens"],
                   kv_capacity_tokens=settings["num_kv_blocks"] * settings["block_size"], date=env["date"])


def print_profile(profile: Profile) -> None:
    rows = [{"prompt_len": n, "prefill_ms": t * 1e3, "tok_per_s": n / t}
            for n, t in zip(profile.prefill_lens, profile.prefill_s)]
    print(format_table(rows, title=f"prefill, {profile.model}"))
    rows = [{"batch": b, **{f"ctx{c}_ms": profile.decode_step_s[i][j] * 1e3 for j, c in enumerate(profile.decode_contexts)}}
            for i, b in enumerate(profile.decode_batches)]
    print(format_table(rows, title="decode step"))
    print(f"cold start (engine load): {profile.cold_start_s:.2f} s")


def run_from_args(args: argparse.Namespace) -> dict:
    from shoal.cluster.flags import engine_kwargs
    from shoal.workers import LLM

    start = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    cold_start = time.perf_counter() - start
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    profile = measure(llm, args.model, cold_start, ints(args.prefill_lens), ints(args.batches), ints(args.contexts),
                      args.decode_steps, args.repeats)
    print_profile(profile)
    if args.output:
        profile.save(args.output)
    payload = {"benchmark": "profile", "model": args.model, "env": environment(),
               "engine_settings": engine_settings(llm.engine), "profile": profile.to_dict()}
    write_json(args.result_file, payload)
    llm.shutdown()
    return payload
