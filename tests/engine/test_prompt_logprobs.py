"""Prompt logprobs equal a full forward's log_softmax: on SmolLM2 (real weights) with the prompt split
by chunked prefill, after a cached prefix (which a prompt_logprobs request must recompute), batched
with requests that ask for none; on a tiny model against transformers itself, under async scheduling
and through preemption."""

from __future__ import annotations

import pytest
import torch

from shoal.workers import LLM, SamplingParams
from shoal.workers.engine.outputs import NewRequestData, SchedulerOutput

BLOCK = 16
PROMPT = ("The capital of France is Paris, the capital of Italy is Rome, the capital of Spain is Madrid "
          "and the capital of Portugal is")


@pytest.fixture(scope="module")
def smol():
    # 24 tokens a step: a 30-token prompt is computed in two chunks
    return LLM("smollm2-135m", device="cpu", dtype="float32", num_kv_blocks=64, block_size=BLOCK,
               max_model_len=512, max_num_batched_tokens=24)


def full_forward_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of our model over every position of ``ids`` in one forward (no cache, no chunks)."""
    runner = llm.engine.runner
    blocks = tuple(range(-(-len(ids) // BLOCK)))
    new = NewRequestData("probe", tuple(ids), len(ids), SamplingParams(temperature=0), blocks, 0)
    sched = SchedulerOutput((new,), (), {"probe": len(ids)}, frozenset())
    runner._update_states(sched)
    inputs, *_ = runner._prepare_inputs(sched)
    with torch.no_grad():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta)
        lp = runner.model.compute_logits(hidden[:len(ids)]).float().log_softmax(-1)  # [P, V]
    runner.requests.pop("probe")
    runner.buffers.block_tables.close("probe")
    assert llm.engine.kv_cache.pool.reset_prefix_cache()  # the probe overwrote blocks: forget what they held
    return lp


def check_against(prompt_logprobs, ids, expected: torch.Tensor, k: int, atol: float) -> None:
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for i in range(1, len(ids)):
        lp = prompt_logprobs[i]
        row = expected[i - 1]
        assert lp.token_id == ids[i]
        assert lp.logprob == pytest.approx(float(row[ids[i]]), abs=atol)
        assert lp.rank == int((row >= row[ids[i]]).sum())
        top_v, top_i = row.topk(k)
        assert len(lp.top) == k
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=atol)
        assert [t for t, _ in lp.top][:1] == top_i.tolist()[:1]


def test_smollm2_prompt_logprobs_equal_a_full_forward_with_chunked_prefill(smol):
    ids = smol.tokenizer.encode(PROMPT)
    assert len(ids) > 24  # split across steps
    expected = full_forward_logprobs(smol, ids)
    plain = SamplingParams(temperature=0, max_tokens=3)
    outs = smol.generate([PROMPT, "Water boils at"], [plain.replace(prompt_logprobs=3), plain])
    check_against(outs[0].prompt_logprobs, ids, expected, 3, atol=2e-3)
    assert outs[1].prompt_logprobs is None  # its batch neighbour asked for none
    alone = smol.generate(PROMPT, plain)[0]
    assert outs[0].outputs[0].token_ids == alone.outputs[0].token_ids  # scoring the prompt changes nothing
    smol.engine.kv_cache.check_no_leak()


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(smol):
    ids = smol.tokenizer.encode(PROMPT)
    expected = full_forward_logprobs(smol, ids)
    warm = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1))[0]  # fills the prefix cache
    again = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1))[0]
    assert again.num_cached_tokens >= BLOCK  # the prefix is cached ...
    scored = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))[0]
    assert scored.num_cached_tokens == 0  # ... but not used: cached tokens have no logits
    check_against(scored.prompt_logprobs, ids, expected, 0, atol=2e-3)
    assert scored.outputs[0].token_ids[:1] == warm.outputs[0].token_ids
    after = smol.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1))[0]
    assert after.num_cached_tokens >= BLOCK  # its blocks went into the cache for the next request
    smol.engine.kv_cache.check_no_leak()


def test_n2_children_share_prompt_logprobs_and_a_one_token_prompt_has_only_null(smol):
    out = smol.generate([[42]], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]
    ids = smol.tokenizer.encode("Once upon a time")
    out = smol.generate("Once upon a time", SamplingParams(n=2, seed=1, max_tokens=2, prompt_logprobs=1))[0]
    assert len(out.prompt_logprobs) == len(ids) and len(out.outputs) == 2


@pytest.mark.parametrize("opts", [dict(async_scheduling=True), dict(num_kv_blocks=12)],
                         ids=["async-scheduling", "preemption"])
def test_tiny_prompt_logprobs_equal_transformers(tiny_checkpoints, opts):
    path, hf = tiny_checkpoints["llama"]
    engine_opts = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, block_size=8,
                       max_num_batched_tokens=20)
    engine_opts.update(opts)
    llm = LLM(path, **engine_opts)
    prompts = [list(range(3 + i, 40 + 2 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=4)
    outs = llm.generate(prompts, params)
    if "num_kv_blocks" in opts:
        assert llm.engine.stats.num_preemptions > 0  # the case this tests
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        check_against(out.prompt_logprobs, ids, expected, 4, atol=1e-4)
    llm.engine.kv_cache.check_no_leak()


def test_prompt_logprobs_limit_is_the_engines(smol):
    with pytest.raises(ValueError) as e:
        smol.generate("Hi", SamplingParams(prompt_logprobs=21))
    assert e.value.field == "prompt_logprobs"
    with pytest.raises(ValueError) as e:
        smol.generate("Hi", SamplingParams(logit_bias={"49152": 1}))
    assert e.value.field == "logit_bias"


def test_engine_resolves_bad_words_with_its_tokenizer_and_applies_the_filters(smol):
    plain = SamplingParams(temperature=0, max_tokens=3)
    paris = smol.generate("The capital of France is", plain)[0].outputs[0]
    assert paris.text.startswith(" Paris")
    banned = smol.generate("The capital of France is", plain.replace(bad_words=["Paris"]))[0].outputs[0]
    assert "Paris" not in banned.text
    target = smol.tokenizer.encode(" Rome", add_special_tokens=False)[0]
    biased = smol.generate("The capital of France is", plain.replace(logit_bias={target: 100}))[0].outputs[0]
    assert biased.token_ids == [target] * 3
    allowed = smol.generate("The capital of France is", plain.replace(allowed_token_ids=[target, 13]))[0]
    assert set(allowed.outputs[0].token_ids) <= {target, 13}
