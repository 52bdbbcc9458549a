"""The Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (per-head q/k RMSNorm).

Plain single-device torch: tensor parallelism is applied as a transform on these modules, and the
kernels come in through ``KernelOps``. Activations are flattened: ``[num_tokens, hidden]`` for the
whole mixed prefill/decode batch, attention metadata says where each token belongs.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import ModelConfig
from .ops import AttentionMetadata, KernelOps, project
from .rotary import cos_sin_cache

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, num_kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: KernelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.ops = ops
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        # Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 and Mistral never do.
        o_bias = bias and cfg.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM")
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        # Set by fusion.fuse_projections: one GEMM for q, k and v, split by these widths.
        self.qkv_proj: nn.Linear | None = None
        self.qkv_split: tuple[int, int, int] = ()

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return tuple(project(self.ops, p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        qkv = project(self.ops, self.qkv_proj, x)  # [num_tokens, q + k + v widths]
        return qkv.split(self.qkv_split, dim=-1)  # views; the kernels take strides

    @property
    def num_local_kv_heads(self) -> int:
        """KV heads this module computes (fewer than the config's on a tensor-parallel shard)."""
        width = self.qkv_split[1] if self.qkv_proj is not None else self.k_proj.out_features
        return width // self.head_dim

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, cos_sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # The head counts come from the weights, so a tensor-parallel shard needs no other change.
        q, k, v = self.project_qkv(x)
        q = q.view(n, -1, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(n, -1, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(n, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        k_cache, v_cache = kv_cache
        q = self.ops.rotary_and_cache(positions, q, k, v, cos_sin, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, self.scale, max_query_len=meta.max_query_len,
                                     max_seq_len=meta.max_seq_len)
        return project(self.ops, self.o_proj, o.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ops = ops
        self.gate_up_proj: nn.Linear | None = None  # set by fusion.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj  # [2 * intermediate, hidden]: gate rows, then up rows
        if fused is not None:  # one op: at decode sizes the activation rides in the GEMM's epilogue
            act = self.ops.linear_silu_and_mul(x, fused.weight, fused.bias)  # [num_tokens, intermediate]
        else:
            gate, up = project(self.ops, self.gate_proj, x), project(self.ops, self.up_proj, x)
            act = self.ops.silu_and_mul(torch.cat((gate, up), dim=-1))
        return project(self.ops, self.down_proj, act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg, ops)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, residual, kv_cache, meta, cos_sin):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class LlamaForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` projects only the rows that sample."""

    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.model = LlamaModel(cfg, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cache = cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [num_tokens] -> hidden: [num_tokens, hidden]
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta, self.cos_sin_cache)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return project(self.ops, self.lm_head, hidden).float()  # [num_rows, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the parameters; every parameter must be provided exactly once."""
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            if name not in params:
                if "rotary_emb" in name:
                    continue
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue  # some checkpoints store the tied head anyway
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor)
            missing.discard(name)
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
