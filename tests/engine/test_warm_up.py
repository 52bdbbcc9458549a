"""The engine's warm-up batches (run before serving on CUDA; called here on CPU): every wave finishes,
and afterwards the engine is as a fresh one — no cached prefix, no counted step or prefix query — and
serves the same greedy tokens as an engine that never warmed up."""

from __future__ import annotations

from shoal.workers.config import EngineConfig
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.llm_engine import LLMEngine


def engine(**kw) -> LLMEngine:
    kw.setdefault("max_model_len", 1024)
    return LLMEngine(EngineConfig(model="tiny-smollm2-vocab", load_format="dummy", device="cpu",
                                  num_kv_blocks=128, **kw))


def run(e: LLMEngine, prompt: list[int]) -> list[int]:
    rid = e.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    out = None
    while e.has_unfinished_requests():
        for o in e.step():
            if o.request_id == rid and o.finished:
                out = o
    return list(out.outputs[0].token_ids)


def test_warm_up_leaves_a_fresh_engine_that_serves_the_same_tokens():
    warmed, fresh = engine(), engine()
    warmed.warm_up()
    assert not warmed.has_unfinished_requests()
    counts = warmed.kv_cache.block_counts()
    assert counts.cached == 0 and counts.free == counts.total
    assert warmed.stats.num_prefix_queries == 0 and warmed.stats.num_steps == 0
    assert warmed.core.times.steps == 0 and warmed.runner.times.prepare_s == 0.0
    prompt = list(range(200, 260))
    assert run(warmed, prompt) == run(fresh, prompt)


def test_waves_larger_than_the_step_budget_or_the_context_are_skipped():
    # 16 x 32 and 16 x 512 do not fit a step, and 512-token prompts not the context (add_request would
    # refuse them): both skipped
    e = engine(max_num_batched_tokens=256, max_model_len=256)
    e.warm_up()
    assert not e.has_unfinished_requests()
