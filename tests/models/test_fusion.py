"""Fused q/k/v and gate/up projections compute exactly what the separate ones did."""

from __future__ import annotations

import torch

from shoal.workers.models.config import ModelConfig
from shoal.workers.models.fusion import fuse_projections, hf_state_dict
from shoal.workers.models.llama import LlamaForCausalLM
from shoal.workers.models.ops import REFERENCE_OPS
from shoal.workers.executor.model_runner import allocate_kv_caches
from shoal.workers.models.ops import AttentionMetadata

CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def run(model, ids):
    kv = allocate_kv_caches(model, 4, 16, torch.float32, torch.device("cpu"))
    n = len(ids)
    meta = AttentionMetadata(torch.arange(n), torch.tensor([0, n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), n, n)
    return model(torch.tensor(ids), torch.arange(n), kv, meta)


def test_fused_model_is_the_same_function():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf(CFG), REFERENCE_OPS)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [5, 17, 3, 99, 42, 7]
    before = run(model, ids)
    assert fuse_projections(model) == 2
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_split == (64, 32, 32) and not hasattr(layer.mlp, "gate_proj")
    assert layer.self_attn.num_local_kv_heads == 2
    torch.testing.assert_close(run(model, ids), before, rtol=1e-5, atol=1e-5)
    # the HF-named view gives back the original tensors (biases included: Qwen2 has qkv bias)
    unfused = hf_state_dict(model)
    assert unfused.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(unfused[k], state[k])
