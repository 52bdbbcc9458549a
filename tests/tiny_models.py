"""Tiny random HF checkpoints and their greedy outputs: the exact-match reference for engine tests."""

from __future__ import annotations

import random

import torch

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

PROMPT_LENS = [1, 3, 17, 32, 33, 64, 150, 300]


def make_tiny_checkpoint(arch: str, path, seed: int = 0):
    """Save a tiny random HF model of ``arch`` to ``path``; returns the HF model (fp32, eval)."""
    import transformers

    cfg_name, model_name, extra = TINY_ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**TINY_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    model.save_pretrained(path)
    return model


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of PROMPT_LENS tokens; some share a 40-token prefix so the prefix cache has hits."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = []
    for i, n in enumerate(PROMPT_LENS):
        if n > 60 and i % 2:
            prompts.append(shared + [rng.randrange(3, vocab) for _ in range(n - len(shared))])
        else:
            prompts.append([rng.randrange(3, vocab) for _ in range(n)])
    return prompts


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, never stopping at eos."""
    outs = []
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early, never mask eos
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs
