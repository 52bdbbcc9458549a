"""A sliding-window model (Mistral v0.1 style) is served exactly up to its window and refused past it:
the engine computes full attention, which equals the model's only while a sequence fits the window."""

from __future__ import annotations

import json

import pytest

from shoal.workers.config import EngineConfig
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.models.config import ModelConfig
from tests.tiny_models import TINY_COMMON, make_tiny_checkpoint


def _with_window(path, window, **extra):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(sliding_window=window, **extra)
    (path / "config.json").write_text(json.dumps(cfg))


def test_a_window_smaller_than_the_positions_caps_the_context():
    base = dict(TINY_COMMON, architectures=["MistralForCausalLM"])
    assert ModelConfig.from_hf({**base, "sliding_window": 64}).max_context_len == 64
    assert ModelConfig.from_hf({**base, "sliding_window": None}).max_context_len == 1024
    assert ModelConfig.from_hf({**base, "sliding_window": 4096}).max_context_len == 1024  # never reached
    # Qwen2 checkpoints name a window and switch it off.
    assert ModelConfig.from_hf({**base, "sliding_window": 64, "use_sliding_window": False}).max_context_len == 1024


def test_the_engine_serves_up_to_the_window_and_refuses_a_longer_max_model_len(tmp_path):
    make_tiny_checkpoint("mistral", tmp_path)
    _with_window(tmp_path, 64)
    engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=16))
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match=r"max_model_len \(128\) must be <= the model's sliding_window \(64"):
        LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", num_kv_blocks=16, max_model_len=128))
