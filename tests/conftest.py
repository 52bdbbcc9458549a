"""Shared fixtures: tiny random HF checkpoints (the exact-match reference) and the real SmolLM2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.3,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1)),
}


def make_tiny_checkpoint(arch: str, path, seed: int = 0):
    """Save a tiny random HF model of ``arch`` to ``path``; returns the HF model (fp32, eval)."""
    import transformers

    cfg_name, model_name, extra = TINY_ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**TINY_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> (checkpoint dir, HF model) for every tiny architecture."""
    out = {}
    for arch in TINY_ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (str(path), make_tiny_checkpoint(arch, path))
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from shoal.workers.models.loader import smollm2_path

    return smollm2_path()
