"""A disaggregated deployment on a real 2-node Ray cluster: a prefill pool (TP=1) on one node, a decode
pool (TP=2: its rank-0 actor starts rank 1 as a local process) on the other, etcd membership, the
router pairing them. Its greedy tokens equal a unified engine's, also when the decode worker already
holds part of a prompt; KV heads are re-split from one rank to two on the way."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from ray_support import LoopThread, two_node_cluster, wait_until

from shoal.cluster.controller import Controller
from shoal.cluster.etcd import EmbeddedEtcd
from shoal.cluster.launch import EtcdRouter
from shoal.cluster.registry import connect, list_workers
from shoal.cluster.spec import DeploymentSpec
from shoal.workers import LLM, SamplingParams
from shoal.workers.models.presets import PRESETS

pytestmark = pytest.mark.slow

NAME = "ray-disagg"
BLOCK = 16
ENGINE = {"load_format": "dummy", "device": "cpu", "dtype": "float32", "num_kv_blocks": 64,
          "max_model_len": 512, "max_num_batched_tokens": 512, "block_size": BLOCK}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, smollm2_path):
    tiny = tmp_path_factory.mktemp("tiny-smol-vocab")
    (tiny / "config.json").write_text(json.dumps(PRESETS["tiny-smollm2-vocab"]))
    engine = {**ENGINE, "tokenizer": str(smollm2_path)}
    pool = {"replicas": 1, "resources_per_rank": {"CPU": 1}, "engine": engine}
    # The decode replica (2 ranks x 1 slot) fits only the second node; reserved first, it leaves the
    # head's one slot to the prefill replica.
    with two_node_cluster(slots=(1, 2)) as _:
        etcd = EmbeddedEtcd(tmp_path_factory.mktemp("etcd") / "data", unsafe_no_fsync=True).start()
        loop = LoopThread()
        spec = DeploymentSpec.from_dict({
            "name": NAME, "model": str(tiny), "pools": {"decode": {**pool, "tensor_parallel_size": 2}, "prefill": pool},
            "router": {"policy": "prefix_aware", "port": 8000, "disagg_min_prefill_tokens": 0},
            "etcd": {"endpoints": etcd.endpoint}})
        client = loop.run(connect(etcd.endpoint))
        controller = Controller(spec, client, etcd_endpoints=etcd.endpoint, lease_ttl_s=3,
                                extra_resources_per_rank={"slot": 1}, start_timeout_s=120)
        router = EtcdRouter(spec, client, host="127.0.0.1", port=0, health_interval_s=0.3)
        try:
            loop.run(controller.start())
            port = loop.run(router.start())
            yield spec, f"http://127.0.0.1:{port}", router, loop, client, str(tiny)
        finally:
            loop.run(router.stop())
            loop.run(controller.stop())
            loop.run(client.close())
            loop.close()
            etcd.stop()


def complete(url: str, model: str, prompt: list[int]) -> dict:
    resp = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_disaggregated_deployment_matches_a_unified_engine(deployment):
    spec, url, router, loop, client, model_dir = deployment
    workers = loop.run(list_workers(client, NAME))
    assert sorted(w.role for w in workers) == ["decode", "prefill"]
    assert len({w.meta["node_id"] for w in workers}) == 2  # one pool per node
    wait_until(lambda: sum(s.healthy for s in router.pool.states()) == 2, 20, "router sees both workers")

    rng = random.Random(0)
    shared = [rng.randrange(100, 40000) for _ in range(2 * BLOCK)]
    prompts = [[rng.randrange(100, 40000) for _ in range(70)],
               shared + [rng.randrange(100, 40000) for _ in range(8)],  # 40 tokens: 2 blocks travel
               shared + [rng.randrange(100, 40000) for _ in range(40)]]  # 72: 2 cached on decode, 2 travel
    # The same dummy weights (same seed) in one unified engine, with the router's tokenizer.
    unified = LLM(model_dir, **{**ENGINE, "tokenizer": spec.pools["decode"].engine["tokenizer"]})
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].text for o in unified.generate(prompts, params)]

    got, cached = [], []
    for prompt in prompts:
        body = complete(url, spec.model, prompt)
        got.append(body["choices"][0]["text"])
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert got == expected
    assert cached == [64, 32, 64]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("shoal_router_disagg_requests_total") and 'outcome="disaggregated"' in ln)
    assert float(line.rsplit(" ", 1)[1]) == 3
