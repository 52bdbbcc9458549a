"""``ModelConfig``: the architecture facts the engine needs, read from an HF ``config.json`` dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# architecture name (HF ``architectures[0]``) -> (qkv bias by default, per-head q/k RMSNorm)
SUPPORTED_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Mistral-style sliding-window attention: each token attends to the last `sliding_window` only.
    # The engine attends to the whole context, which is the same thing up to the window, so a model
    # with a window is served up to it and no further (see max_context_len), never wrongly past it.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config head_dim must be even (rotary), got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model config sliding_window must be >= 1 or null, got {self.sliding_window}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} (config 'architectures'); supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        default_bias, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        heads = hf["num_attention_heads"]
        # transformers 5 moved rope settings into `rope_parameters`; older configs keep them at the top.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, llama3")
            scaling = None if kind == "default" else dict(scaling)
        # Qwen2 configs name a window but switch it off with use_sliding_window: false.
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", default_bias)),
            qk_norm=qk_norm,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window,
        )

    @property
    def max_context_len(self) -> int:
        """The longest sequence the engine computes exactly: the positions the model knows, and no
        more than its attention window (past it, full attention would differ from the model's)."""
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            return self.sliding_window
        return self.max_position_embeddings

    def context_limit_reason(self) -> str:
        if self.max_context_len < self.max_position_embeddings:
            return (f"the model's sliding_window ({self.sliding_window}; shoal computes full attention, which "
                    f"equals the model's only within its window)")
        return f"the model's max_position_embeddings ({self.max_position_embeddings})"

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads
