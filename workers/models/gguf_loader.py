"""A GGUF file, made to look like a Hugging Face checkpoint: an HF config dict and HF-named weights.

llama.cpp's converter (convert_hf_to_gguf.py) changes three things on the way in; each is undone here:

1. Names: `model.layers.{i}.self_attn.q_proj.weight` becomes `blk.{i}.attn_q.weight` and so on
   (`_GLOBAL_NAMES`, `_BLOCK_NAMES`); the config becomes `{arch}.*` metadata keys.
2. For arch `llama` (Mistral GGUFs use it too) the rows of q_proj and k_proj, weight and bias, are
   permuted within each head from HF's half-split rotary layout ([x0..x_{d/2-1} | x_{d/2}..]) to
   GGML's interleaved one ([x0, x_{d/2}, x1, ...]); `_unpermute_rows` inverts that, so a neox-style
   rotary gives HF's results. Qwen2/Qwen3 are converted without the permutation.
3. Llama-3 rope scaling is not written as metadata but baked into a `rope_freqs.weight` tensor of
   per-frequency divisors; `_llama3_rope_scaling` recovers an equivalent HF `rope_scaling` dict.

Tensors are read lazily: `gguf.GGUFReader` memory-maps the file and each weight is dequantized only
when the iterator reaches it. Opening a file parses all metadata (~3 s for a 49k-token vocabulary),
so code that wants both the config and the weights should hold one `GGUFCheckpoint`.
"""

from __future__ import annotations

import copy
import math
import os
import re
from functools import cached_property
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFCheckpoint",
    "read_gguf_config",
    "iter_gguf_weights",
    "gguf_tensor_types",
]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# model_type -> HF class name; "mistral" is a model_type only (its GGUF arch is "llama").
_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",  # llama with attention_bias=True
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",  # llama with mlp_bias=True
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Tensors that describe the config rather than hold weights.
_CONFIG_TENSORS = frozenset({"rope_freqs.weight"})

# Types with a direct numpy view; every other type goes through a block dequantizer.
_FLOAT_VIEWS = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
}


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config.json-style dict of the GGUF file at `path`."""
    return GGUFCheckpoint(path).config


def iter_gguf_weights(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, dequantized to `dtype`, in HF shapes, one tensor in memory at a time.

    A bad path, architecture or dtype raises here; a bad tensor raises when the iterator reaches it.
    """
    return GGUFCheckpoint(path).weights(dtype)


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, str]:
    """HF weight name -> GGML type name (`"Q4_1"`, `"F32"`, ...) for each weight the file holds."""
    return GGUFCheckpoint(path).tensor_types()


class GGUFCheckpoint:
    """One open GGUF file of a supported architecture. Nothing is dequantized until `weights()` runs."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"GGUF file {self.path!r} does not exist or is not a file")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors, ...
            raise ValueError(f"{self.path!r} is not a readable GGUF file: {exc}") from exc
        if self._reader.byte_order == "S":
            raise ValueError(f"{self.path!r} is a byte-swapped (big-endian) GGUF file; only little-endian is supported")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.arch = self._metadata("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{self.path!r}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        experts = self._metadata(f"{self.arch}.expert_count", 0)
        if experts:
            raise ValueError(
                f"{self.path!r}: mixture-of-experts GGUF ({self.arch}.expert_count={experts}) is not supported"
            )

    # -- metadata --------------------------------------------------------------------------------

    def _metadata(self, key: str, default: Any = ...) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path!r}: GGUF metadata key {key!r} is missing")
            return default
        return _field_value(field)

    def _arch_key(self, suffix: str, default: Any = ...) -> Any:
        return self._metadata(f"{self.arch}.{suffix}", default)

    @property
    def config(self) -> dict[str, Any]:
        """HF config.json-style dict (a fresh copy each time); see the module docstring for the sources."""
        return copy.deepcopy(self._config)

    @cached_property
    def _config(self) -> dict[str, Any]:
        num_heads = self._arch_key("attention.head_count")
        num_kv_heads = self._num_kv_heads(num_heads)
        head_dim = self._head_dim(num_heads)
        rope_theta = float(self._arch_key("rope.freq_base", 10000.0))
        model_type = self._model_type()
        config = {
            "architectures": [_HF_ARCHITECTURE[model_type]],
            "model_type": model_type,
            "vocab_size": self._vocab_size(),
            "hidden_size": self._arch_key("embedding_length"),
            "intermediate_size": self._arch_key("feed_forward_length"),
            "num_hidden_layers": self._arch_key("block_count"),
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self._arch_key("attention.layer_norm_rms_epsilon"),
            "rope_theta": rope_theta,
            "rope_scaling": self._rope_scaling(rope_theta, head_dim),
            "max_position_embeddings": self._arch_key("context_length"),
            "sliding_window": self._arch_key("attention.sliding_window", None),
            # llama.cpp writes output.weight only when it differs from the embedding matrix.
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": any(name.endswith(".attn_q.bias") for name in self._tensors),
            "bos_token_id": self._metadata("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self._metadata("tokenizer.ggml.eos_token_id", None),
            "pad_token_id": self._metadata("tokenizer.ggml.padding_token_id", None),
            "torch_dtype": self._torch_dtype(),
        }
        return config

    def _num_kv_heads(self, num_heads: int) -> int:
        value = self._arch_key("attention.head_count_kv", num_heads)
        if isinstance(value, list):  # some archs write one count per layer; ours needs them all equal
            if len(set(value)) != 1:
                raise ValueError(
                    f"{self.path!r}: attention.head_count_kv differs between layers ({sorted(set(value))})"
                )
            value = value[0]
        return value

    def _model_type(self) -> str:
        if self.arch != "llama":
            return self.arch
        # Mistral GGUFs are arch "llama"; only the name tells them apart (transformers does the same).
        names = " ".join(str(self._metadata(k, "")) for k in ("general.name", "general.basename"))
        return "mistral" if "mistral" in names.lower() else "llama"

    def _vocab_size(self) -> int:
        embed = self._tensors.get("token_embd.weight")
        if embed is not None:
            return int(embed.shape[1])  # ggml order: [hidden, vocab]
        return self._arch_key("vocab_size")

    def _head_dim(self, num_heads: int) -> int:
        """`attention.key_length` when written (Qwen3, Mistral-Nemo), else q_proj rows / heads."""
        head_dim = self._arch_key("attention.key_length", None)
        if head_dim is None:
            q = self._tensors.get("blk.0.attn_q.weight")
            if q is not None:
                head_dim = int(q.shape[1]) // num_heads
            else:
                head_dim = self._arch_key("embedding_length") // num_heads
        value_dim = self._arch_key("attention.value_length", head_dim)
        if value_dim != head_dim:
            raise ValueError(
                f"{self.path!r}: attention.value_length={value_dim} != key_length={head_dim} is not supported"
            )
        rope_dim = self._arch_key("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise ValueError(
                f"{self.path!r}: partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                "is not supported"
            )
        return head_dim

    def _rope_scaling(self, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self._arch_key("rope.scaling.type", "none")
        factors = self._tensors.get("rope_freqs.weight")
        if factors is not None:
            if kind != "none":
                raise ValueError(f"{self.path!r}: both rope_freqs.weight and rope.scaling.type={kind!r} are set")
            divisors = _dequantize(factors, torch.float64).numpy().reshape(-1)
            try:
                return _llama3_rope_scaling(divisors, rope_theta, head_dim)
            except ValueError as exc:
                raise ValueError(f"{self.path!r}: rope_freqs.weight: {exc}") from exc
        if kind == "none":
            return None
        factor = float(self._arch_key("rope.scaling.factor"))
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            scaling = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": self._arch_key("rope.scaling.original_context_length"),
            }
            for gguf_key, hf_key in (
                ("rope.scaling.yarn_attn_factor", "attention_factor"),
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ):
                value = self._arch_key(gguf_key, None)
                if value is not None:
                    scaling[hf_key] = float(value)
            return scaling
        raise ValueError(f"{self.path!r}: rope.scaling.type={kind!r} is not supported (supported: none, linear, yarn)")

    def _torch_dtype(self) -> str:
        """The float type of the linear weights; quantized files say float16 (their scales are fp16)."""
        q = self._tensors.get("blk.0.attn_q.weight")
        qtype = q.tensor_type if q is not None else None
        if qtype == GGMLQuantizationType.F32:
            return "float32"
        if qtype == GGMLQuantizationType.BF16:
            return "bfloat16"
        return "float16"

    # -- tensors ---------------------------------------------------------------------------------

    def _hf_name(self, gguf_name: str) -> str:
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        match = _BLOCK_RE.fullmatch(gguf_name)
        if match is not None and match.group(2) in _BLOCK_NAMES:
            layer = int(match.group(1))
            num_layers = self._arch_key("block_count")
            if layer >= num_layers:
                raise ValueError(f"{self.path!r}: tensor {gguf_name!r} is past block_count={num_layers}")
            return f"model.layers.{layer}.{_BLOCK_NAMES[match.group(2)]}"
        raise ValueError(
            f"{self.path!r}: GGUF tensor {gguf_name!r} has no Hugging Face counterpart for arch {self.arch!r}"
        )

    def tensor_types(self) -> dict[str, str]:
        """HF weight name -> GGML type name, for each tensor `weights()` yields."""
        return {
            self._hf_name(t.name): t.tensor_type.name for t in self._reader.tensors if t.name not in _CONFIG_TENSORS
        }

    def weights(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) in file order; linears are [out_features, in_features] like HF's."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        num_heads = self._arch_key("attention.head_count")
        unpermute = {}
        if self.arch == "llama":
            unpermute = {"self_attn.q_proj": num_heads, "self_attn.k_proj": self._num_kv_heads(num_heads)}
        return self._iter_weights(dtype, unpermute)

    def _iter_weights(self, dtype: torch.dtype, unpermute: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
        for tensor in self._reader.tensors:
            if tensor.name in _CONFIG_TENSORS:
                continue
            name = self._hf_name(tensor.name)
            try:
                weight = _dequantize(tensor, dtype)
            except ValueError as exc:
                raise ValueError(f"{self.path!r}: {exc}") from exc
            heads = unpermute.get(".".join(name.split(".")[-3:-1]))  # "self_attn.q_proj" or None
            if heads is not None:
                weight = _unpermute_rows(weight, heads, name)
            yield name, weight


# -- helpers ---------------------------------------------------------------------------------------


def _field_value(field: Any) -> Any:
    """A metadata field as a Python scalar, str, or list of them."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return [_scalar(field.parts[i], field.types[-1]) for i in field.data]
    return _scalar(field.parts[field.data[0]], kind)


def _scalar(part: np.ndarray, kind: GGUFValueType) -> Any:
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if kind == GGUFValueType.BOOL:
        return bool(part[0])
    return part[0].item()


def _dequantize(tensor: Any, dtype: torch.dtype) -> torch.Tensor:
    """The tensor's values in `dtype`, shaped in row-major (HF) order: ggml's dims reversed."""
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if qtype in _FLOAT_VIEWS:
        values = torch.from_numpy(np.array(tensor.data, dtype=_FLOAT_VIEWS[qtype]))  # copy off the memmap
    elif qtype == GGMLQuantizationType.BF16:
        values = torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16)
    elif qtype == GGMLQuantizationType.Q8_K:
        values = torch.from_numpy(_dequantize_q8_k(tensor.data))
    else:
        try:
            values = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype))
        except NotImplementedError:
            raise ValueError(
                f"tensor {tensor.name!r} has GGML type {qtype.name}, which cannot be dequantized"
            ) from None
    return values.reshape(shape).to(dtype)


def _dequantize_q8_k(data: np.ndarray) -> np.ndarray:
    """Q8_K blocks of 256: float32 scale d, 256 int8 quants, 16 int16 partial sums (unused here)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K]
    blocks = np.ascontiguousarray(data).reshape(-1, type_size)
    d = blocks[:, :4].copy().view(np.float32)  # [n_blocks, 1]
    q = blocks[:, 4 : 4 + block_size].view(np.int8).astype(np.float32)  # [n_blocks, 256]
    return (d * q).reshape(-1)


def _unpermute_rows(weight: torch.Tensor, num_heads: int, name: str) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs, 2) -> (2, pairs), i.e. interleaved -> half-split.

    weight: [num_heads * head_dim, ...] (a q/k projection or its bias).
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"{name}: {rows} rows do not split into {num_heads} heads of even size")
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return per_head.transpose(1, 2).reshape(weight.shape).contiguous()


def _llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    """The HF llama3 `rope_scaling` whose per-frequency divisors are `divisors` (the rope_freqs tensor).

    llama3 divides frequency i by 1 (short wavelengths), by `factor` (long ones) or, between, by
    1 / ((1 - s) / factor + s) with s = orig / wavelen / (high - low) - low / (high - low). Only the two
    ratios A = orig / (high - low) and B = low / (high - low) matter, so (orig, low, high) is fixed up
    to scale; a least-squares fit of s against 1/wavelen gives A and B, and we pick the scale that makes
    low_freq_factor 1 (Meta's value, so a Llama-3.x file gives back its own numbers).
    """
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"expected {head_dim // 2} rope divisors (head_dim / 2), got shape {divisors.shape}")
    factor = float(divisors.max())
    if math.isclose(factor, 1.0) and np.allclose(divisors, 1.0):
        return None
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    inv_wavelen = inv_freq / (2 * math.pi)
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)  # 1 where unscaled, 0 where divided by factor
    middle = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if middle.sum() < 2:
        raise ValueError("fewer than 2 frequencies in the smooth region; cannot recover llama3 rope scaling")
    slope, intercept = np.polyfit(inv_wavelen[middle], smooth[middle], 1)  # smooth = A/wavelen - B
    ratio_a, ratio_b = slope, -intercept
    if ratio_b <= 0 or ratio_a <= 0:
        raise ValueError("the divisors do not follow the llama3 rope-scaling shape")
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round((1 + ratio_b) / ratio_b, 4),
        "original_max_position_embeddings": int(round(ratio_a / ratio_b)),
    }
    rebuilt = _llama3_divisors(scaling, rope_theta, head_dim)
    if not np.allclose(rebuilt, divisors, rtol=1e-3, atol=0):
        raise ValueError("the divisors do not follow the llama3 rope-scaling shape")
    return scaling


def _llama3_divisors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """llama3 rope scaling as per-frequency divisors, the way llama.cpp's converter writes rope_freqs."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    inv_freq = rope_theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)
