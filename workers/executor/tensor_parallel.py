"""Tensor parallelism as a transform of the single-device Llama model (gpt-fast / Megatron style).

``apply_tensor_parallel`` swaps modules in place; the model file stays free of distributed code:

- q/k/v and gate/up are column-parallel: each rank holds a slice of the output features and needs no
  communication, so the shard is a plain ``nn.Linear`` and ``fusion.fuse_projections`` still fuses
  it (a fused model is sharded part by part: its q/k/v or gate/up slices are stacked again);
- o_proj and down_proj are row-parallel (a slice of the input features, then an all-reduce of the
  output; a bias is added once, after the reduce);
- the embedding is vocab-parallel (a slice of the rows; ids outside it give zero rows; all-reduce);
- the LM head is vocab-parallel with an all-gather, so every rank holds the full logits and samples
  the same tokens. Tied embeddings stay tied: head and embedding share the one shard.

Heads: rank ``r`` owns query heads ``[r * H // N, (r+1) * H // N)`` and holds the KV heads they read
(a KV head shared by two ranks' query heads is held by both). Local query slots are laid out KV head
by KV head, the same number of slots per KV head on every rank (the most query heads of one KV head any
rank owns); a slot no owned head fills is a padding head with zero q/o weights, so it adds nothing to
the output. Ranks are padded to the same number of KV slots (a padding slot repeats a held KV head and
has only padding query slots), so every rank has the same shapes. When ``N`` divides the heads evenly
along KV groups (the usual case) there is no padding at all: ``[r * H/N, (r+1) * H/N)`` and its KV
heads, split when there are at least ``N`` KV heads, replicated on ``N / kv`` ranks otherwise.
SmolLM2's 9 query heads over 3 KV heads split in two as ``[0, 1, 2 | 3, -, -]`` and ``[-, 4, 5 | 6, 7, 8]``.
The vocab is padded up to a multiple of ``N`` with zero rows; the padded logits are cut off after
the gather. Norms (Qwen3's per-head q/k norms act on ``head_dim``) and the rotary cache are replicated.

``load_model_shard`` builds the model on the meta device, shards it, then streams the checkpoint
through the same slicing rules, so a rank only ever allocates its own shard on its device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shoal.workers.models.config import ModelConfig
from shoal.workers.models.fusion import fuse_projections
from shoal.workers.models.llama import LlamaForCausalLM
from shoal.workers.models.loader import ModelSource, _default_dtype, safetensors_files
from shoal.workers.models.ops import KernelOps
from shoal.workers.models.rotary import cos_sin_cache

ProcessGroup = dist.ProcessGroup | None  # None: the default (world) group


PAD = -1  # a padding query slot: zero weights, no head of the model


@dataclass(frozen=True)
class TPLayout:
    """The slice of the model one rank holds; ranges are in features and vocab rows."""

    rank: int
    world_size: int
    head_dim: int
    q_heads: tuple[int, ...]  # per local query slot: its query head in the model, or PAD
    kv_heads: tuple[int, ...]  # per local KV slot: its KV head in the model
    intermediate_start: int
    intermediate_per_rank: int
    vocab_start: int
    vocab_per_rank: int  # padded: ceil(vocab_size / world_size)
    vocab_size: int

    @property
    def num_q_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)


def _owned_heads(cfg: ModelConfig, rank: int, world_size: int) -> dict[int, list[int]]:
    """KV head -> the query heads reading it that ``rank`` owns, in head order."""
    heads, group = cfg.num_attention_heads, cfg.num_kv_groups
    owned: dict[int, list[int]] = {}
    for h in range(heads * rank // world_size, heads * (rank + 1) // world_size):
        owned.setdefault(h // group, []).append(h)
    return owned


def tp_layout(cfg: ModelConfig, rank: int, world_size: int) -> TPLayout:
    """Which heads, MLP features and vocab rows ``rank`` owns; ValueError when the model cannot split."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    heads = cfg.num_attention_heads
    if world_size > heads:
        raise ValueError(f"tensor_parallel_size ({world_size}) must be <= num_attention_heads ({heads}): "
                         f"a rank holds at least one query head")
    if cfg.intermediate_size % world_size:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) must be divisible by "
                         f"tensor_parallel_size ({world_size})")
    per_rank = [_owned_heads(cfg, r, world_size) for r in range(world_size)]
    slots_per_kv = max(len(qs) for owned in per_rank for qs in owned.values())
    kv_slots = max(len(owned) for owned in per_rank)
    owned = per_rank[rank]
    kv_heads = list(owned)
    q_heads = [q for k in kv_heads for q in owned[k] + [PAD] * (slots_per_kv - len(owned[k]))]
    for _ in range(kv_slots - len(kv_heads)):  # the same shapes on every rank
        kv_heads.append(kv_heads[-1])
        q_heads += [PAD] * slots_per_kv
    inter = cfg.intermediate_size // world_size
    vocab_per = math.ceil(cfg.vocab_size / world_size)
    return TPLayout(rank, world_size, cfg.head_dim, tuple(q_heads), tuple(kv_heads),
                    rank * inter, inter, rank * vocab_per, vocab_per, cfg.vocab_size)


Rows = range | tuple[int, ...]  # rows of a tensor along one dim: a contiguous range, or one by one (PAD: zeros)


def _head_rows(heads: tuple[int, ...], head_dim: int) -> Rows:
    """The feature rows of these heads: a range when they are consecutive (no padding), else row by row."""
    if PAD not in heads and list(heads) == list(range(heads[0], heads[0] + len(heads))):
        return range(heads[0] * head_dim, (heads[0] + len(heads)) * head_dim)
    return tuple(PAD if h == PAD else h * head_dim + i for h in heads for i in range(head_dim))


def shard_rule(layout: TPLayout, name: str) -> tuple[int, Rows] | None:
    """``(dim, rows)`` of HF tensor ``name`` that this rank holds; None: every rank holds all of it."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, range(layout.vocab_start, layout.vocab_start + layout.vocab_per_rank)
    module, kind = name.split(".")[-2:]
    q_rows = _head_rows(layout.q_heads, layout.head_dim)
    kv_rows = _head_rows(layout.kv_heads, layout.head_dim)
    inter = range(layout.intermediate_start, layout.intermediate_start + layout.intermediate_per_rank)
    if module == "q_proj":
        return 0, q_rows
    if module in ("k_proj", "v_proj"):
        return 0, kv_rows
    if module in ("gate_proj", "up_proj"):
        return 0, inter
    if module == "o_proj" and kind == "weight":
        return 1, q_rows
    if module == "down_proj" and kind == "weight":
        return 1, inter
    return None  # norms, row-parallel biases


def _pad_rows(part: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero rows past the real vocab, so every rank's vocab shard has the same size (all-gather)."""
    missing = length - part.shape[dim]
    if missing == 0:
        return part
    shape = list(part.shape)
    shape[dim] = missing
    return torch.cat((part, part.new_zeros(shape)), dim=dim)


def take_rows(tensor: torch.Tensor, dim: int, rows: Rows) -> torch.Tensor:
    """``rows`` of ``tensor`` along ``dim``, in their own storage; rows past the end or PAD are zeros."""
    size = tensor.shape[dim]
    if isinstance(rows, range):
        start, stop = min(rows.start, size), min(rows.stop, size)
        part = tensor.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)
        return _pad_rows(part, dim, len(rows))
    index = torch.tensor([max(r, 0) for r in rows], device=tensor.device)
    part = tensor.index_select(dim, index)
    pads = [i for i, r in enumerate(rows) if r == PAD]
    return part.index_fill_(dim, torch.tensor(pads, device=tensor.device), 0) if pads else part


def shard_tensor(layout: TPLayout, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full HF tensor, in its own storage (the full tensor can be freed)."""
    rule = shard_rule(layout, name)
    return tensor if rule is None else take_rows(tensor, *rule)


# -- the parallel modules ----------------------------------------------------------------------------


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` around existing tensors (nothing allocated, nothing initialised)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class _ShardLinear(nn.Module):
    """A linear layer over one shard; ``in/out_features`` are the shard's. ``linear`` is the kernel set's
    GEMM (``KernelOps.linear``: the skinny decode kernel where it wins), F.linear by default."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: ProcessGroup,
                 linear: Callable = F.linear):
        super().__init__()
        self.linear = linear
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.group = group

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class RowParallelLinear(_ShardLinear):
    """Input features split across ranks: partial products are summed by an all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, in_features / N] -> y: [num_tokens, out_features], the same on every rank
        y = self.linear(x, self.weight, None)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias  # once, not N times


class VocabParallelEmbedding(nn.Module):
    """Rows ``[vocab_start, vocab_start + rows)`` of the table; other ids look up zeros, then all-reduce."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, hidden]
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(x, group=self.group)
        return x

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, vocab_start={self.vocab_start}, hidden={self.weight.shape[1]}"


class ParallelLMHead(_ShardLinear):
    """Each rank projects onto its vocab slice; an all-gather gives every rank the full logits."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, world_size: int, group: ProcessGroup,
                 linear: Callable = F.linear):
        super().__init__(weight, None, group, linear)
        self.vocab_size = vocab_size
        self.world_size = world_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, hidden] -> logits: [num_rows, vocab_size]
        local = self.linear(hidden, self.weight, None).contiguous()  # [num_rows, vocab_per_rank]
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


# -- the transform -----------------------------------------------------------------------------------


def _column_parallel(layout: TPLayout, linear: nn.Linear, names: list[str], widths: list[int]) -> nn.Linear:
    """The shard of a column-parallel layer: a plain ``nn.Linear``, since it needs no communication.

    ``names``/``widths``: the HF layers stacked in ``linear`` (one, or q/k/v or gate/up once fused);
    each is sliced by its own rule and the slices stacked again, so a fused layer stays fused.
    """
    def shard(tensor: torch.Tensor, kind: str) -> torch.Tensor:
        parts = tensor.detach().split(widths, dim=0)
        shards = [shard_tensor(layout, f"{n}.{kind}", t) for n, t in zip(names, parts)]
        return shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)

    return _linear(shard(linear.weight, "weight"), None if linear.bias is None else shard(linear.bias, "bias"))


def _row_parallel(layout: TPLayout, linear: nn.Linear, name: str, group: ProcessGroup,
                  ops: KernelOps) -> RowParallelLinear:
    weight = shard_tensor(layout, f"{name}.weight", linear.weight.detach())
    return RowParallelLinear(weight, None if linear.bias is None else linear.bias.detach(), group, ops.linear)


def _shard_columns(layout: TPLayout, module: nn.Module, fused_attr: str, parts: tuple[str, ...], prefix: str,
                   fused_widths: tuple[int, ...]) -> tuple[int, ...]:
    """Column-shard q/k/v or gate/up, fused into one layer or not; returns the parts' shard widths."""
    names = [f"{prefix}.{part}" for part in parts]
    fused = getattr(module, fused_attr)
    if fused is not None:
        setattr(module, fused_attr, _column_parallel(layout, fused, names, list(fused_widths)))
    else:
        for part, name in zip(parts, names):
            linear = getattr(module, part)
            setattr(module, part, _column_parallel(layout, linear, [name], [linear.out_features]))
    return tuple(len(shard_rule(layout, f"{name}.weight")[1]) for name in names)


def _shard_layer(layout: TPLayout, layer: nn.Module, prefix: str, group: ProcessGroup, ops: KernelOps) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    split = _shard_columns(layout, attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), f"{prefix}.self_attn",
                           attn.qkv_split)
    if attn.qkv_proj is not None:  # fused at load (fusion.fuse_projections)
        attn.qkv_split = split
    attn.o_proj = _row_parallel(layout, attn.o_proj, f"{prefix}.self_attn.o_proj", group, ops)
    attn.num_heads, attn.num_kv_heads = layout.num_q_heads, layout.num_kv_heads
    half = mlp.gate_up_proj.out_features // 2 if mlp.gate_up_proj is not None else 0
    _shard_columns(layout, mlp, "gate_up_proj", ("gate_proj", "up_proj"), f"{prefix}.mlp", (half, half))
    mlp.down_proj = _row_parallel(layout, mlp.down_proj, f"{prefix}.mlp.down_proj", group, ops)


def apply_tensor_parallel(model: LlamaForCausalLM, rank: int, world_size: int,
                          group: ProcessGroup = None) -> LlamaForCausalLM:
    """Rewrite ``model`` in place into rank ``rank``'s shard of a ``world_size``-way split; returns it.

    Works on loaded weights (each is sliced) and on a meta-device model (shapes only; see
    ``load_model_shard``). ``group`` is used only in forward, so a model can be sharded (and its shapes
    checked) before any process group exists. ``world_size == 1`` leaves the model as it is.
    """
    layout = tp_layout(model.config, rank, world_size)
    if world_size == 1:
        return model
    for i, layer in enumerate(model.model.layers):
        _shard_layer(layout, layer, f"model.layers.{i}", group, model.ops)
    embed = VocabParallelEmbedding(
        shard_tensor(layout, "model.embed_tokens.weight", model.model.embed_tokens.weight.detach()),
        layout.vocab_start, group)
    model.model.embed_tokens = embed
    if model.config.tie_word_embeddings:
        head_weight = embed.weight  # the same Parameter: still tied
    else:
        head_weight = shard_tensor(layout, "lm_head.weight", model.lm_head.weight.detach())
    model.lm_head = ParallelLMHead(head_weight, layout.vocab_size, world_size, group, model.ops.linear)
    model.tp_layout = layout
    return model


# -- shard-only loading ------------------------------------------------------------------------------


def shard_weights(layout: TPLayout, weights: Iterable[tuple[str, torch.Tensor]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Slice full HF tensors as they stream in (GGUF, or anything read whole on the host)."""
    for name, tensor in weights:
        yield name, shard_tensor(layout, name, tensor)


def iter_safetensors_shard(path: Path, dtype: torch.dtype, layout: TPLayout
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Only this rank's slice of each tensor is read from the files (``get_slice``), then cast."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                rule = shard_rule(layout, key)
                if rule is None:
                    yield key, f.get_tensor(key).to(dtype)
                    continue
                dim, rows = rule
                if not isinstance(rows, range):  # padded heads: read the tensor, then pick its rows
                    yield key, take_rows(f.get_tensor(key), dim, rows).to(dtype)
                    continue
                sl = f.get_slice(key)
                size = sl.get_shape()[dim]
                start, stop = min(rows.start, size), min(rows.stop, size)
                part = sl[start:stop] if dim == 0 else sl[:, start:stop]
                yield key, _pad_rows(part.to(dtype), dim, len(rows))


def iter_dummy_weights(full: LlamaForCausalLM, dtype: torch.dtype, device: torch.device, seed: int
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The full tensors ``loader.init_dummy_weights`` would give a whole model, one at a time.

    Same parameter order, generator and device, so a sharded dummy model is a slice of the TP=1 one.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in full.named_parameters():
        t = torch.empty(param.shape, dtype=dtype, device=device)
        yield name, t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=gen)


def _materialize(model: LlamaForCausalLM, device: torch.device) -> None:
    """Meta -> empty storage on ``device``; re-tie the head and rebuild the (non-persistent) rotary cache."""
    model.to_empty(device=device)
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty gave each its own tensor
    model.cos_sin_cache = cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                        cfg.rope_scaling).to(device)


def load_model_shard(source: ModelSource, *, dtype: torch.dtype, device: torch.device, ops: KernelOps,
                     rank: int, world_size: int, group: ProcessGroup = None, load_format: str = "auto",
                     seed: int = 0) -> LlamaForCausalLM:
    """Rank ``rank``'s shard of the model of ``source``, loaded without ever allocating the full model."""
    cfg = ModelConfig.from_hf(source.hf_config)
    layout = tp_layout(cfg, rank, world_size)
    if source.kind == "preset" and load_format != "dummy":
        raise ValueError(f"model {source.name!r} is a shape preset without weights: "
                         "use load_format='dummy' (--load-format dummy)")
    with torch.device("meta"), _default_dtype(dtype):
        model = LlamaForCausalLM(cfg, ops)
        full = LlamaForCausalLM(cfg, ops) if load_format == "dummy" else None  # names and shapes only
    apply_tensor_parallel(model, rank, world_size, group)
    _materialize(model, device)
    if load_format == "dummy":
        weights = shard_weights(layout, iter_dummy_weights(full, dtype, device, seed))
    elif source.kind == "gguf":
        weights = shard_weights(layout, source.gguf.weights(dtype))
    else:
        weights = iter_safetensors_shard(source.path, dtype, layout)
    model.load_weights(weights)
    fuse_projections(model)  # as loader.load_model does, on the shard
    return model.eval()
