"""The offline LLM on a tiny model: validation, aborts without leaks, n > 1, seeds, prefix savings."""

from __future__ import annotations

import random

import pytest

from shoal.workers import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    return LLM(path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=128, block_size=8)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused(llm):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="max_model_len is 256"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**6]])
    with pytest.raises(ValueError, match="has no tokenizer"):
        llm.generate("text needs a tokenizer")
    # a refused prompt leaves nothing behind, not even the good prompts before it
    with pytest.raises(ValueError):
        llm.generate([[5, 6, 7], []])
    assert not llm.engine.has_unfinished_requests()
    llm.engine.kv_cache.check_no_leak()


def test_bad_model_paths_and_architectures(tmp_path):
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(tmp_path))


def test_n_samples_share_the_prompt_and_differ(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)
    before = llm.engine.stats.num_computed_tokens
    out = llm.generate([list(range(3, 43))], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # the 40-token prompt is computed once (its 5 full blocks are shared), not three times
    computed = llm.engine.stats.num_computed_tokens - before
    assert computed < 40 + 2 * 8 + 3 * 8
    llm.engine.kv_cache.check_no_leak()


def test_seeded_request_is_reproducible_in_any_batch(llm):
    rng = random.Random(0)
    target = [rng.randrange(3, 300) for _ in range(20)]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    alone = llm.generate([target], params)[0].outputs[0].token_ids
    others = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 60))] for _ in range(5)]
    noisy = SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True)
    batch = llm.generate(others[:2] + [target] + others[2:], [noisy, noisy, params, noisy, noisy, noisy])
    assert batch[2].outputs[0].token_ids == alone


def test_prefix_cache_hits_skip_computation(llm):
    rng = random.Random(1)
    prefix = [rng.randrange(3, 300) for _ in range(64)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    stats = llm.engine.stats
    llm.generate([prefix + [11, 12]], params)
    before_computed, before_hits = stats.num_computed_tokens, stats.num_prefix_hits
    second = llm.generate([prefix + [13, 14]], params)[0]
    assert stats.num_prefix_hits - before_hits == 64
    assert second.num_cached_tokens == 64
    # only the 2 new prompt tokens and the decode steps ran through the model
    assert stats.num_computed_tokens - before_computed == 2 + 3


def test_abort_mid_generation_frees_every_block(llm):
    engine = llm.engine
    rng = random.Random(2)
    ids = [engine.add_request([rng.randrange(3, 300) for _ in range(rng.randrange(5, 90))],
                              SamplingParams(max_tokens=40, ignore_eos=True)) for _ in range(6)]
    for _ in range(3):
        engine.step()
    for rid in ids[::2]:
        engine.abort_request(rid)
    finished = set()
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == set(ids[1::2])
    engine.kv_cache.check_no_leak()
