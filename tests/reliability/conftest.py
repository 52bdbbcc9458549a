"""Real components for the reliability suite.

The router-side fixtures (a tiny engine behind ``LocalWorker``, a real ``RouterHost``) are the ones
``tests/router/conftest.py`` defines; that conftest only applies to its own folder, so the few
pieces needed here are imported from it rather than written twice. The ``shoal serve`` helpers are
``tests/cluster/serve_support.py``'s, imported by the test modules themselves.
"""

from __future__ import annotations

import json
import tempfile

import pytest

from shoal.workers.async_engine import AsyncEngine
from shoal.workers.config import EngineConfig
from shoal.workers.llm_engine import LLMEngine
from shoal.workers.models.files import smollm2_path
from shoal.workers.tokenizer import Tokenizer
from tests.router.conftest import BLOCK_SIZE, TINY_CONFIG, Routers


@pytest.fixture(scope="module")
def tiny_router():
    """A tiny engine (SmolLM2's vocabulary, random weights) behind a real router host on 127.0.0.1.

    ``max_model_len`` is small on purpose (64; a chat prompt takes 31 of it): whatever a fuzzed
    request asks for, it generates at most a few dozen tokens per choice, so hundreds of them stay
    bounded in time. -> (url, app, engine)."""
    with tempfile.TemporaryDirectory() as model_dir:
        with open(f"{model_dir}/config.json", "w") as f:
            json.dump(TINY_CONFIG, f)
        cfg = EngineConfig(model=model_dir, load_format="dummy", device="cpu", dtype="float32", kv_events=True,
                           num_kv_blocks=256, block_size=BLOCK_SIZE, max_model_len=64)
        engine = AsyncEngine(LLMEngine(cfg), worker_id="fuzz-0").start()
        routers = Routers()
        try:
            url, app = routers.start([engine], Tokenizer.from_path(smollm2_path()), policy="round_robin")
            yield url, app, engine
        finally:
            routers.stop_all()
            engine.shutdown()
