"""Async scheduling (forced on, on CPU) gives the tokens the synchronous engine gives, and leaks nothing.

On CPU a step has run to the end when ``submit`` returns, but every piece of the overlap runs:
placeholders in the scheduler, step N+1 scheduled before step N is applied, the runner's device-side
gather of the previous step's sampled ids, late publishing of blocks that a placeholder filled,
discarded tokens of requests that ended while their next step was in flight.
"""

from __future__ import annotations

import random

import pytest

from shoal.workers import LLM, SamplingParams
from shoal.workers.config import EngineConfig
from shoal.workers.engine.core import EngineCore
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.engine.outputs import ModelRunnerOutput, SchedulerOutput
from shoal.workers.engine.request import Request, RequestStatus
from shoal.workers.engine.scheduler import Scheduler, SchedulerConfig
from shoal.workers.executor.pending_step import PendingStep
from shoal.workers.options import OptionError

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=96, block_size=8)
LENS = (1, 3, 9, 17, 24, 33)  # short: the reference kernels on CPU are slow per token


def pair(path, **kw):
    return {mode: LLM(path, async_scheduling=mode, **{**ENGINE, **kw}) for mode in (False, True)}


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    return pair(tiny_checkpoints["llama"][0])


def run(llm, prompts, params):
    outs = llm.generate(prompts, params)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.kv_cache.check_no_leak()
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.text, c.logprobs) for c in o.outputs] for o in outs]


def same(engines, prompts, params):
    sync, overlapped = (run(engines[m], prompts, params) for m in (False, True))
    assert overlapped == sync
    return sync


def prompts_for(engines=None, seed=0, lens=LENS):
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lens]


def test_auto_is_off_on_cpu_and_forced_on_here(engines, tiny_checkpoints):
    assert engines[True].engine.core.async_scheduling and engines[True].engine.scheduler.config.async_scheduling
    assert not engines[False].engine.core.async_scheduling
    auto = LLM(tiny_checkpoints["llama"][0], **ENGINE)
    assert not auto.engine.async_scheduling


def test_tensor_parallel_refuses_async_naming_the_field():
    with pytest.raises(OptionError, match="EngineConfig.async_scheduling") as e:
        EngineConfig(model="x", async_scheduling=True, tensor_parallel_size=2)
    assert e.value.field == "async_scheduling"
    EngineConfig(model="x", async_scheduling=None, tensor_parallel_size=2)  # auto: off there


def test_greedy_is_token_identical(engines):
    lens = [3, 7, 12, 1, 10, 5]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
    same(engines, prompts_for(engines), params)


def test_seeded_sampling_with_logprobs_is_token_identical(engines):
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=s, max_tokens=10,
                             ignore_eos=True, logprobs=2 if s % 2 else None) for s in range(len(LENS))]
    out = same(engines, prompts_for(engines, 1), params)
    assert out[1][0][4] is not None and len(out[1][0][4]) == 10


def test_n_greater_than_one_is_identical(engines):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=9, ignore_eos=True)
    out = same(engines, prompts_for(engines, 2)[:3], params)
    assert len(out[0]) == 3


def test_stop_token_mid_flight_discards_the_next_step(engines):
    """A stop token the scheduler cannot foresee: the request was already scheduled for one more step,
    whose token is discarded and whose blocks come back (check_no_leak in run)."""
    prompts = prompts_for(engines, 3)
    free_run = run(engines[False], prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stops = sorted({toks[0][0][len(toks[0][0]) // 2] for toks in free_run})[:4]
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=stops)
    out = same(engines, prompts, params)
    assert any(c[1] == "stop" and len(c[0]) < 12 for o in out for c in o)


def test_eos_stops_the_same(engines):
    prompts = prompts_for(engines, 4)
    free_run = run(engines[False], prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    eos = engines[True].engine.eos_token_ids
    same(engines, prompts, SamplingParams(temperature=0, max_tokens=12))
    # eos as a stop rule, with min_tokens (its sampler reads the output on the host: the runner
    # collects the step in flight first) and penalties (same)
    same(engines, prompts, SamplingParams(temperature=0, max_tokens=12, min_tokens=3, repetition_penalty=1.3,
                                          stop_token_ids=[free_run[0][0][0][2]]))
    assert engines[True].engine.runner.times.early_collects > 0
    assert eos


def test_stop_strings_are_identical(smollm2_path):
    kw = dict(device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=8,
              load_format="dummy", tokenizer=str(smollm2_path))
    llms = {m: LLM("tiny-smollm2-vocab", async_scheduling=m, **kw) for m in (False, True)}
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 17, 9, 30)]
    free_run = run(llms[False], prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    stops = [t[0][3][len(t[0][3]) // 2:][:3] for t in free_run if len(t[0][3]) > 8][:2]
    assert stops
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stops)
    out = same(llms, prompts, params)
    assert any(c[1] == "stop" for o in out for c in o)


def test_preemption_is_identical_and_leaks_nothing(tiny_checkpoints):
    llms = pair(tiny_checkpoints["llama"][0], num_kv_blocks=10, max_model_len=64, block_size=4)
    prompts = prompts_for(seed=5, lens=(6, 9, 12, 5, 8))
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=14, ignore_eos=True) for i in range(len(prompts))]
    same(llms, prompts, params)
    assert llms[True].engine.stats.num_preemptions > 0


def test_chunked_prefill_is_identical(tiny_checkpoints):
    llms = pair(tiny_checkpoints["llama"][0], max_num_batched_tokens=8)
    same(llms, prompts_for(seed=6), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))


def test_blocks_filled_by_placeholders_publish_late_and_hit(engines):
    """A follow-up prompt = an earlier prompt + its output hits the blocks decoding filled, as many
    as the synchronous engine's, although each such block filled while its last id was unknown."""
    prompt = prompts_for(engines, 7)[5]  # 33 tokens; block size 8
    hits = {}
    for mode, llm in engines.items():
        llm.engine.kv_cache.pool.reset_prefix_cache()
        first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
        before = llm.engine.stats.num_prefix_hits
        llm.generate([prompt + first.outputs[0].token_ids], SamplingParams(temperature=0, max_tokens=2))
        hits[mode] = llm.engine.stats.num_prefix_hits - before
        llm.engine.kv_cache.check_no_leak()
    assert hits[True] == hits[False] >= 56  # 63 tokens: 7 whole blocks, 4 of them filled by decoding


def test_abort_mid_flight_leaks_nothing(engines):
    prompts = prompts_for(engines, 8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = {}
    for mode, llm in engines.items():
        eng = llm.engine
        ids = [eng.add_request(p, params, request_id=f"{mode}-{i}") for i, p in enumerate(prompts)]
        tokens = {rid: [] for rid in ids}
        steps = 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                tokens[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            if steps == 4:
                for rid in ids[::2]:
                    eng.abort_request(rid)  # their next step is in flight (async)
        eng.kv_cache.check_no_leak()
        got[mode] = [tokens[rid] for rid in ids[1::2]]
        for rid in ids[::2]:
            assert len(tokens[rid]) < 12
    assert got[True] == got[False]


# -- the scheduler's placeholders, with a fake executor -----------------------------------------

class FakeAsyncRunner:
    """Samples token 7 for every request that catches up; never looks at token ids."""

    def __init__(self):
        self.submitted: list[SchedulerOutput] = []

    def execute(self, sched):
        return self.submit(sched).collect()

    def submit(self, sched):
        self.submitted.append(sched)
        return PendingStep.ready(ModelRunnerOutput({rid: 7 for rid in sched.num_scheduled_tokens}))


def test_placeholders_schedule_the_next_decode_before_the_token_is_known():
    kv = KVCacheManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=64, async_scheduling=True), kv)
    req = Request("r", [1, 2, 3], SamplingParams(max_tokens=3))
    sched.add_request(req)
    s1 = sched.schedule()
    assert s1.num_scheduled_tokens == {"r": 3} and req.num_placeholders == 1 and req.num_tokens == 3
    s2 = sched.schedule()  # step 1's token is not known yet: its placeholder is decoded
    assert s2.num_scheduled_tokens == {"r": 1} and req.num_placeholders == 2
    s3 = sched.schedule()  # two in flight, max_tokens 3: one more
    assert s3.num_scheduled_tokens == {"r": 1} and req.num_placeholders == 3
    assert sched.schedule().is_empty  # the three in flight reach max_tokens: not scheduled again
    outs = [sched.update_from_output(s, ModelRunnerOutput({"r": 7})) for s in (s1, s2, s3)]
    assert [o[0].finish_reason for o in outs] == [None, None, "length"]
    assert req.output_token_ids == [7, 7, 7] and req.status is RequestStatus.FINISHED_LENGTH
    kv.check_no_leak()


def test_engine_core_returns_each_step_one_call_late_and_drains():
    kv = KVCacheManager(32, 4)
    sched = Scheduler(SchedulerConfig(max_model_len=64, async_scheduling=True), kv)
    core = EngineCore(sched, FakeAsyncRunner(), async_scheduling=True)
    core.add_request(Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4)))
    assert core.step() == []  # step 0 submitted, nothing collected yet
    tokens = []
    while core.has_unfinished_requests():
        tokens += [t for o in core.step() for t in o.new_token_ids]
    assert tokens == [7, 7, 7, 7]
    kv.check_no_leak()


def test_core_refuses_a_mismatch():
    kv = KVCacheManager(8, 4)
    with pytest.raises(ValueError, match="agree"):
        EngineCore(Scheduler(SchedulerConfig(), kv), FakeAsyncRunner(), async_scheduling=True)
