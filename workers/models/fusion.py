"""Fuse projections that read the same input into one wider GEMM: q/k/v, and gate/up.

The same math with fewer, wider matmuls: at decode batch sizes a GEMM is bound by reading its
weights, and thin ones (k and v are a fraction of q's width) run far under the memory bandwidth.
Applied after loading, so checkpoints keep their HF names and the model file its plain layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import LlamaForCausalLM


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=has_bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears], dim=0))
    return fused


def _plain(*modules) -> bool:
    # Only plain linears: a sharded or quantized layer has its own forward that fusing would skip.
    return all(type(m) is nn.Linear for m in modules) and len({m.bias is None for m in modules}) == 1


def fuse_projections(model: LlamaForCausalLM) -> int:
    """Fuse in place; returns how many layers were fused (the original layers are dropped)."""
    fused = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None and _plain(attn.q_proj, attn.k_proj, attn.v_proj):
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.qkv_split = tuple(m.out_features for m in parts)
            attn.qkv_proj = _concat(parts)
            del attn.q_proj, attn.k_proj, attn.v_proj
            fused += 1
        if mlp.gate_up_proj is None and _plain(mlp.gate_proj, mlp.up_proj):
            mlp.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
    return fused


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The weights under their HF names again (fused projections split back), e.g. to build an HF
    transformers model with exactly the same weights."""
    out = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if ".qkv_proj" in prefix or ".gate_up_proj" in prefix:
            owner = model.get_submodule(prefix.rsplit(".", 1)[0])
            if prefix.endswith("qkv_proj"):
                names, widths = ("q_proj", "k_proj", "v_proj"), owner.qkv_split
            else:
                names, widths = ("gate_proj", "up_proj"), (tensor.shape[0] // 2,) * 2
            base = prefix.rsplit(".", 1)[0]
            for part_name, part in zip(names, tensor.split(widths, dim=0)):
                out[f"{base}.{part_name}.{leaf}"] = part
        else:
            out[name] = tensor
    return out
