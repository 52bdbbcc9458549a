"""Two GPUs: tensor parallelism over NCCL gives TP=1's greedy tokens, and a prefill worker on one GPU
hands its KV blocks to a decode worker on the other over an NCCL link, tokens unchanged."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import torch
from tiny_models import make_prompts

from shoal.workers import LLM, SamplingParams

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 GPUs", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cuda", dtype="float32", max_model_len=512, num_kv_blocks=256, max_num_seqs=16)


@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "smollm2"])
def test_tp2_over_nccl_matches_tp1(request, tiny_checkpoints, arch, cuda_graphs):
    """smollm2: the bundled model, whose 9 query heads split 5 + 4 with padding slots."""
    if arch == "smollm2":
        path = str(request.getfixturevalue("smollm2_path"))
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    else:
        path, model = tiny_checkpoints[arch]
        prompts = make_prompts(model.config.vocab_size)
    tp1 = LLM(path, cuda_graphs=cuda_graphs, **ENGINE)
    expected = [o.outputs[0].token_ids for o in tp1.generate(prompts, GREEDY)]
    del tp1
    tp2 = LLM(path, tensor_parallel_size=2, cuda_graphs=cuda_graphs, **ENGINE)
    try:
        print(f"[tp2] {arch} graphs={cuda_graphs}: engine up", file=sys.stderr, flush=True)
        for _ in range(2):  # the second round hits the prefix cache
            assert [o.outputs[0].token_ids for o in tp2.generate(prompts, GREEDY)] == expected
        tp2.engine.kv_cache.check_no_leak()
    finally:
        tp2.shutdown()


def test_kv_blocks_move_between_gpus_over_nccl(tiny_checkpoints):
    """Prefill on cuda:0, decode on cuda:1, blocks over an NCCL KVLink: the unified tokens."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workers"))
    from test_disagg import Worker, disaggregated, prompt_of, served, unified_tokens

    path, _ = tiny_checkpoints["llama"]
    prompts = [prompt_of(70, seed=1), prompt_of(200, seed=2)]

    async def main():
        expected = await unified_tokens(path, prompts, device="cuda:0")
        async with served(Worker(path, "p", "prefill", device="cuda:0"),
                          Worker(path, "d", "decode", device="cuda:1")) as (p, d):
            assert d.engine.kv_device == torch.device("cuda", 1)
            for i, prompt in enumerate(prompts):
                tokens, cached, _ = await disaggregated(p, d, f"g{i}", prompt)
                assert tokens == expected[i] and cached == (len(prompt) - 1) // 16 * 16
            assert d.engine.num_kv_fallbacks == 0
            assert d.engine.decode_side.num_received_blocks == 4 + 12
            await p.check_no_leak()
            await d.check_no_leak()

    asyncio.run(main())
