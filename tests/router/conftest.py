"""Real components for the router tests: engines behind ``LocalWorker``s, apps on real uvicorn.

Two kinds of engine:
- SmolLM2-135M (real weights, the real tokenizer and chat template): loaded once per session; its
  answers are meaningful (" Paris"), each decode step costs ~70 ms on CPU, so keep max_tokens small.
- tiny: a 2-layer Llama shape with SmolLM2's vocabulary and random ("dummy") weights. Text prompts
  tokenize with the real tokenizer, its output is noise, a step takes milliseconds and it loads in
  well under a second: for limits, failures, placement and disconnects.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from shoal.router.config import RouterConfig  # noqa: E402
from shoal.router.app import create_app  # noqa: E402
from shoal.router.host import RouterHost  # noqa: E402
from shoal.router.local_worker import LocalWorker  # noqa: E402
from shoal.router.worker_pool import make_pool  # noqa: E402
from shoal.workers.tokenizer import Tokenizer  # noqa: E402
from shoal.workers.models.presets import PRESETS  # noqa: E402

BLOCK_SIZE = 16

TINY_CONFIG = PRESETS["tiny-smollm2-vocab"]  # 2 layers, SmolLM2's vocabulary


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path):
    return Tokenizer.from_path(smollm2_path)


@pytest.fixture(scope="session")
def smol_engine():
    from shoal.workers.async_engine import AsyncEngine
    from shoal.workers.config import EngineConfig
    from shoal.workers.llm_engine import LLMEngine

    cfg = EngineConfig(model="smollm2-135m", device="cpu", dtype="float32", kv_events=True,
                       num_kv_blocks=256, block_size=BLOCK_SIZE, max_model_len=1024)
    engine = AsyncEngine(LLMEngine(cfg), worker_id="smol-0").start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-smol-vocab")
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.fixture(scope="session")
def make_tiny_engine(tiny_model_dir):
    """``make_tiny_engine(worker_id, **engine_config)`` -> a started AsyncEngine, shut down at the end."""
    from shoal.workers.async_engine import AsyncEngine
    from shoal.workers.config import EngineConfig
    from shoal.workers.llm_engine import LLMEngine

    engines = []

    def make(worker_id: str, **overrides):
        opts = dict(model=tiny_model_dir, load_format="dummy", device="cpu", dtype="float32", kv_events=True,
                    num_kv_blocks=512, block_size=BLOCK_SIZE, max_model_len=4096)
        opts.update(overrides)
        engine = AsyncEngine(LLMEngine(EngineConfig(**opts)), worker_id=worker_id).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


class ServerThread:
    """The router's own host (``RouterHost``: what ``shoal serve`` runs) for ``app`` on 127.0.0.1 and a
    free port, on an event loop in a background thread. It serves at once (not waiting for a
    healthy worker: tests decide what the pool holds); ``drain_timeout_s`` is the stop's drain."""

    def __init__(self, app, drain_timeout_s: float = 5.0):
        self.app = app
        self.host = RouterHost(app, "127.0.0.1", 0, drain_timeout_s=drain_timeout_s)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="router-host")

    def start(self) -> "ServerThread":
        self.thread.start()
        self._call(self.host.start(30, need_workers=False))
        self.port = self.host.bound[1]
        self.url = self.host.url
        return self

    def _call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> int:
        """Drain and close; -> how many requests the drain deadline cut."""
        try:
            return self._call(self.host.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(15)
            assert not self.thread.is_alive(), "the router host did not stop"
            self.loop.close()


class Routers:
    """Starts router apps on real uvicorn servers and stops them all at the end of its scope."""

    def __init__(self):
        self.servers: list[ServerThread] = []

    def start(self, workers, tokenizer, policy: str = "round_robin", policy_options: dict | None = None,
              poll_interval_s: float = 0.2, **config):
        """-> (url, app). ``workers``: AsyncEngines or worker handles (LocalWorker, GrpcWorkerClient);
        ``config``: RouterConfig fields."""
        opts = dict(policy_options or {})
        if policy == "prefix_aware":
            opts.setdefault("block_size", BLOCK_SIZE)
        cfg = RouterConfig(placement=policy, placement_options=opts, health_interval_s=poll_interval_s, **config)
        pool = make_pool(cfg)
        for w in workers:
            pool.add(w if hasattr(w, "get_load") else LocalWorker(w))  # an AsyncEngine is wrapped
        app = create_app(cfg, pool, tokenizer)
        server = ServerThread(app).start()
        self.servers.append(server)
        return server.url, app

    def stop_all(self) -> None:
        while self.servers:
            self.servers.pop().stop()


@pytest.fixture
def serve():
    """``serve(workers, tokenizer, policy=..., **router_config) -> (url, app)``; stopped after the test."""
    routers = Routers()
    yield routers.start
    routers.stop_all()


@pytest.fixture(scope="module")
def serve_module():
    """Like ``serve``, but the servers live until the end of the test module."""
    routers = Routers()
    yield routers.start
    routers.stop_all()
