"""Greedy outputs equal HF transformers token for token, whatever the engine does underneath:
prefix caching on or off, chunked prefill under a small budget, preemption under a small block pool."""

from __future__ import annotations

import pytest
from tiny_models import hf_greedy, make_prompts

from shoal.workers import LLM, SamplingParams

MAX_TOKENS = 12


ENGINE_VARIANTS = {
    "prefix-cache": dict(enable_prefix_caching=True),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked-small-budget": dict(max_num_batched_tokens=48, enable_prefix_caching=True),
    "preemption": dict(num_kv_blocks=40, block_size=16, max_num_batched_tokens=64),
}


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    out = {}
    for arch, (path, model) in tiny_checkpoints.items():
        prompts = make_prompts(model.config.vocab_size)
        out[arch] = (path, prompts, hf_greedy(model, prompts, MAX_TOKENS))
    return out


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf(references, arch, variant):
    path, prompts, expected = references[arch]
    kwargs = {"num_kv_blocks": 256, **ENGINE_VARIANTS[variant]}
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=512, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # Submit twice: the second round runs against a warm prefix cache.
    for _ in range(2):
        outs = llm.generate(prompts, params)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == expected
        llm.engine.kv_cache.check_no_leak()
    if variant == "preemption":
        assert llm.engine.stats.num_preemptions > 0
