"""The model's projections go through ``KernelOps.linear`` / ``linear_silu_and_mul``: with those set to
the gemv kernels (interpreted here) a tiny fused model computes what the reference ops compute, and the
tensor-parallel shards keep the kernel set's GEMM."""

from __future__ import annotations

import dataclasses

import torch

from shoal.kernels import gemv as G
from shoal.workers.executor.model_runner import allocate_kv_caches
from shoal.workers.executor.tensor_parallel import apply_tensor_parallel
from shoal.workers.models.config import ModelConfig
from shoal.workers.models.fusion import fuse_projections
from shoal.workers.models.llama import LlamaForCausalLM
from shoal.workers.models.ops import REFERENCE_OPS, AttentionMetadata, kernel_ops, project

# Qwen2: qkv bias (the kernel's bias path), GQA; odd widths for the kernel's tails
CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=100, hidden_size=48, intermediate_size=40,
           num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16)
SMALL = G.GemvConfig(block_n=16, block_k=16, split_k=2)


def _run(model, ids):
    kv = allocate_kv_caches(model, 4, 16, torch.float32, torch.get_default_device())  # cuda when compiled
    n = len(ids)
    meta = AttentionMetadata(torch.arange(n), torch.tensor([0, n], dtype=torch.int32),
                             torch.tensor([n], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32), n, n)
    hidden = model(torch.tensor(ids), torch.arange(n), kv, meta)
    return model.compute_logits(hidden)


def _model(ops):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf(CFG), ops)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fuse_projections(model)
    return model


def test_model_through_gemv_matches_reference():
    calls = {"linear": 0, "silu": 0}

    def linear(x, w, b=None):
        calls["linear"] += 1
        return G.gemv(x, w, b, SMALL)

    def linear_silu_and_mul(x, w, b=None):
        calls["silu"] += 1
        return G.gemv_silu_and_mul(x, w, b, SMALL)

    ops = dataclasses.replace(REFERENCE_OPS, name="gemv", linear=linear, linear_silu_and_mul=linear_silu_and_mul)
    ids = [5, 17, 3, 99, 42]  # 5 tokens: an M the kernel pads to 8
    want = _run(_model(REFERENCE_OPS), ids)
    got = _run(_model(ops), ids)
    # per layer qkv, o_proj, down (3 linears) and gate_up (fused); then the LM head
    assert calls == {"linear": 3 * 2 + 1, "silu": 2}
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_ops_wire_gemv():
    ops = kernel_ops("triton")
    assert ops.linear is G.linear and ops.linear_silu_and_mul is G.linear_silu_and_mul


def test_project_runs_other_layers_forward():
    seen = []

    class Shard(torch.nn.Linear):  # not a plain nn.Linear: its own forward must run
        def forward(self, x):
            seen.append(x.shape)
            return super().forward(x)

    ops = dataclasses.replace(REFERENCE_OPS, linear=lambda *a: (_ for _ in ()).throw(AssertionError("ops.linear")))
    y = project(ops, Shard(4, 3), torch.ones(2, 4))
    assert y.shape == (2, 3) and seen == [(2, 4)]


def test_tensor_parallel_shards_keep_the_kernel_sets_gemm():
    ops = dataclasses.replace(REFERENCE_OPS, linear=G.linear)
    model = _model(ops)
    apply_tensor_parallel(model, 0, 2)  # the group is used only in forward
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.linear is G.linear and layer.mlp.down_proj.linear is G.linear
    assert model.lm_head.linear is G.linear
    assert type(layer.self_attn.qkv_proj) is torch.nn.Linear  # column shards: project() sends them to ops.linear
    assert type(layer.mlp.gate_up_proj) is torch.nn.Linear
